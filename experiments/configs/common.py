"""Pieces shared by the experiment configs (the trainer's defaults live in paperzoo.config)."""

from __future__ import annotations

from experiments import prerequisites
from paperzoo.config import ConfigDict

# Time-Series-Library's default decoder context for encoder-decoder forecasters.
LABEL_LEN = 48


def forecasting_data(name: str, *, seq_len: int, pred_len: int) -> ConfigDict:
  """The `data` section of a forecasting config (keys explained in paperzoo.tasks.forecasting).

  The decoder context is min(48, seq_len // 2): TSLib's 48 at lookback 96, and 18 at ILI's
  lookback 36 as its ILI scripts use. Models without a decoder ignore it.
  """
  label_len = min(LABEL_LEN, seq_len // 2)
  return ConfigDict({"name": name, "root": "", "seq_len": seq_len, "label_len": label_len,
                     "pred_len": pred_len})


def forecasting_protocol(config: ConfigDict) -> ConfigDict:
  """Time-Series-Library's long-term forecasting training protocol.

  Adam, batch 32, 10 epochs, early stopping with patience 3 on validation MSE, MSE loss, seed
  2021; the learning rate of `lradj=type1`: after epoch e (from 0) TSL sets lr * 0.5 ** e for
  the next, so the first two epochs train at lr, then it halves every epoch.
  """
  config.task = ConfigDict({"name": "forecasting", "loss": "mse"})
  config.train.batch_size = 32
  config.train.num_epochs = 10
  config.train.patience = 3
  config.optimizer.name = "adam"
  config.optimizer.schedule = "step"
  config.optimizer.decay_rate = 0.5
  config.optimizer.decay_every_epochs = 1
  config.optimizer.decay_start_epoch = 1
  return config


def reference_classifier(data: str, *, runlocal: bool = False) -> dict[str, str]:
  """The `task` keys that name the reference classifier scoring a generation config's samples
  (`paperzoo.generation.metrics.reference_run`): the one classifier every run on `data` shares
  (reference_workdir "" = cache_dir("reference_classifiers")/<data>), or for runlocal configs a
  two-step classifier of its own in the cache. `experiments.run` trains it when it is missing
  and the config scores samples."""
  if not runlocal:
    return {"reference_workdir": "", "reference_config": f"data={data}"}
  arg = "data=mnist,runlocal"
  return {"reference_workdir": str(prerequisites.cached_workdir(
      "reference_classifiers", "reference_classifier", arg)), "reference_config": arg}


def runlocal(config: ConfigDict) -> ConfigDict:
  """Shrinks a config to a smoke run: two training steps, tiny batches, no progress bar."""
  config.train.num_steps = 2
  config.train.batch_size = 8
  config.train.eval_batch_size = 512
  config.train.log_every_steps = 1
  config.train.progress_bar = False
  return config


# The `data` section of each classification data set, keys explained in
# paperzoo.data.classification. Sizes are the papers'; configs shrink them for CPU variants.
_CLASSIFICATION_DATA = {
    "listops": {"num_train": 96_000, "num_val": 2_000, "num_test": 2_000, "min_len": 500,
                "max_len": 2_000, "seq_len": 2_000, "generator_seed": 0},
    "pathfinder": {"num_train": 160_000, "num_val": 20_000, "num_test": 20_000,
                   "resolution": 32, "contour_length": 14, "generator_seed": 0},
    "lra_image": {"val_fraction": 0.1, "resolution": 32},
    "cifar10": {"val_fraction": 0.1},
    "mnist": {"val_fraction": 0.1},
    "uea": {"subset": "BasicMotions", "val_fraction": 0.2, "legacy_test_selection": False},
}


def classification_data(name: str, **overrides) -> ConfigDict:
  """The `data` section of a classification config; unknown names and keys fail here."""
  if name not in _CLASSIFICATION_DATA:
    raise ValueError(f"unknown classification data set {name!r}; valid: "
                     f"{', '.join(sorted(_CLASSIFICATION_DATA))}")
  section = {"name": name, "root": "", "val_seed": 0, **_CLASSIFICATION_DATA[name]}
  unknown = set(overrides) - set(section)
  if unknown:
    raise ValueError(f"unknown keys {sorted(unknown)} for data set {name!r}; valid: "
                     f"{', '.join(sorted(section))}")
  section.update(overrides)
  return ConfigDict(section)


def classification_task(*, label_smoothing: float = 0.0, crop_padding: int = 0,
                        flip: bool = False, mixup_alpha: float = 0.0, randaugment_ops: int = 0,
                        randaugment_magnitude: int = 9) -> ConfigDict:
  """The `task` section of a classification config (keys in paperzoo.tasks.classification)."""
  return ConfigDict({"name": "classification", "label_smoothing": label_smoothing,
                     "crop_padding": crop_padding, "flip": flip, "mixup_alpha": mixup_alpha,
                     "randaugment_ops": randaugment_ops,
                     "randaugment_magnitude": randaugment_magnitude})


def runlocal_classification(config: ConfigDict) -> ConfigDict:
  """`runlocal` for classification: two steps, generated data sets shrunk to a few dozen short
  examples, and image configs on MNIST (evaluating two steps on CIFAR-10's 15,000 held-out
  images costs minutes; CIFAR-10 reading has its own tests in tests/test_image_data.py)."""
  runlocal(config)
  if config.data.name == "cifar10":
    config.data = classification_data("mnist")
    config.task.crop_padding, config.task.flip = 2, False
  if config.data.name == "listops":
    config.data.update(num_train=64, num_val=16, num_test=16, min_len=10, max_len=60,
                       seq_len=64)
  elif config.data.name == "pathfinder":
    config.data.update(num_train=64, num_val=16, num_test=16)
  return config


def image_classification_recipe(config: ConfigDict, data: str, *, epochs: int) -> ConfigDict:
  """The small-data recipe every image backbone here trains with (CIFAR-10 from scratch):
  AdamW, learning rate 1e-3, 5 warmup epochs then cosine decay, weight decay 0.05, batch 128,
  gradient clipping at 1, random crop (padding 4) + flip and label smoothing 0.1 on CIFAR-10;
  on MNIST (7,201 training digits) random crop with padding 2 and no flip (digits are not
  mirror-symmetric), 100 warmup steps: without the crop a tiny ViT stays near 91% there.
  On CIFAR-10 also RandAugment as torchvision's default (2 operations at magnitude bin 9 of
  30; DeiT's rand-m9 counts on a 0-10 scale and is three times stronger), and weight decay
  spares biases, normalization scales, layer scales, position embeddings, class tokens and
  position-bias tables, as DeiT's and Swin's recipes do; the MNIST recipe, whose runs are
  recorded (experiments/results/classification.md), has neither."""
  if data not in ("cifar10", "mnist"):
    raise ValueError(f"image backbones train on cifar10 or mnist, got data={data!r}")
  cifar = data == "cifar10"
  config.data = classification_data(data)
  config.task = classification_task(label_smoothing=0.1 if cifar else 0.0,
                                    crop_padding=4 if cifar else 2, flip=cifar,
                                    randaugment_ops=2 if cifar else 0)
  config.train.batch_size = 128
  config.train.eval_batch_size = 500
  config.train.num_epochs = epochs
  config.train.patience = 0
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 5 * (45_000 // 128) if cifar else 100
  config.optimizer.grad_clip_norm = 1.0
  if cifar:
    config.optimizer.decay_vectors = False
    config.optimizer.no_decay_pattern = NO_DECAY_PATTERN
  return config


# Mamba keeps its state matrix (A_log) and skip (D) out of weight decay.
MAMBA_NO_DECAY_PATTERN = r"A_log|(^|/)D$"
# Parameters that DeiT-, Swin-, PoolFormer- and Agent-Attention-style recipes keep out of
# weight decay beyond the vectors: learned positions, class tokens, the position-bias tables
# of window and agent attention, the layer scales (stored [2, d] per block here) and, for the
# mamba mixer, Mamba's.
NO_DECAY_PATTERN = (r"positions|class_token|relative_position_bias|agent_bias|query_bias|"
                    r"layer_scales|" + MAMBA_NO_DECAY_PATTERN)

# Every mixer key with its default (paperzoo.layers.mixers), so that a config can swap the mixer
# with one argument; a model section starts from these.
MIXER_DEFAULTS = {
    "num_heads": 4, "attention_dropout": 0.0, "attention_impl": "xla", "window_size": 4,
    "agent_num": 16, "routing_regions": 2, "routing_topk": 2, "pool_size": 3, "d_state": 16,
    "d_conv": 4, "expand": 2, "scan_impl": "auto",
}
