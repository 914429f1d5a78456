r"""Long Range Arena (Tay et al., ICLR 2021): ListOps, Image (grayscale CIFAR-10 pixels) and
Pathfinder-32, with the token mixer as an argument.

  python -m experiments.run --workdir=/tmp/lra_listops \
      --config=experiments/configs/lra.py:task=listops
  python -m experiments.run --workdir=/tmp/lra_image_mamba \
      --config=experiments/configs/lra.py:task=image,mixer=mamba
  python -m experiments.run --workdir=/tmp/lra_pathfinder_cpu \
      --config=experiments/configs/lra.py:task=pathfinder,size=cpu

Arguments: task (listops | image | pathfinder), mixer (attention: the LRA Transformer baseline
| linear | mamba | agent), size ("full": LRA's data sizes, for a GPU; "cpu": smaller data and
model that train on 2 CPU cores in 10 to 120 minutes, recorded as such), epochs (0: the
variant's default), seed, runlocal (two steps).

The model is `sequence_classifier` (embedding of the token or pixel ids, sinusoidal positions,
pre-norm MetaFormer blocks, masked mean pooling): the LRA baseline recipe of a small encoder
and a pooled classifier. Full size: d_model 256, 4 layers, 4 heads, MLP ratio 4 (our choice
for all three tasks, not the LRA paper's per-task sizes), AdamW (learning rate 5e-4, weight
decay 0.01 except on Mamba's A_log and D, 1,000 warmup steps, cosine). Data at full size:
ListOps 96k/2k/2k expressions of 500 to 2,000 tokens; Image 45k/5k/10k; Pathfinder
160k/20k/20k.
CPU size: a 2-layer, 64-wide model on sequences of 256 tokens: ListOps 20k/2k/2k expressions
of 50 to 250 tokens (seq_len 256); Pathfinder 20k/2k/2k images generated at 16x16 (the
generator scales every length, contour length 14 as at 32); Image the full set, each 2x2 block
of pixels averaged (16x16). At LRA's 1,024 tokens a training step of this small model costs
about 8 s on 2 CPU cores (batch 64), about seven hours for ten epochs. The CPU models stay at
chance on Pathfinder, at 16x16 and also with markers drawn larger than the paths: Pathfinder
needs the full size (both in experiments/results/classification_notes.md).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

_DATA = {"listops": "listops", "image": "lra_image", "pathfinder": "pathfinder"}
_CPU_DATA = {
    "listops": dict(num_train=20_000, num_val=2_000, num_test=2_000, min_len=50, max_len=250,
                    seq_len=256),
    "pathfinder": dict(num_train=20_000, num_val=2_000, num_test=2_000, resolution=16),
    "image": dict(resolution=16),
}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, task="listops", mixer="attention", size="full", epochs=0, seed=2021,
                  runlocal=False)
  if arg.task not in _DATA:
    raise ValueError(f"unknown LRA task {arg.task!r}; valid: {', '.join(_DATA)}")
  if arg.size not in ("full", "cpu"):
    raise ValueError(f"size must be full or cpu, got {arg.size!r}")
  cpu = arg.size == "cpu" or arg.runlocal  # runlocal smoke-tests the small model
  config = base_config()
  config.seed = arg.seed
  config.data = common.classification_data(_DATA[arg.task],
                                            **(_CPU_DATA[arg.task] if cpu else {}))
  config.task = common.classification_task()
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "sequence_classifier", "mixer": arg.mixer,
      "d_model": 64 if cpu else 256, "num_layers": 2 if cpu else 4, "num_heads": 4,
      "mlp_ratio": 2.0 if cpu else 4.0, "positions": "sinusoidal", "dropout": 0.1,
      "drop_path": 0.0, "layer_scale_init": 0.0, "init": "lecun",
  })
  config.train.batch_size = 64 if cpu else 32
  config.train.eval_batch_size = 256
  config.train.num_epochs = arg.epochs or (10 if cpu else 20)
  config.train.patience = 0
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3 if cpu else 5e-4
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200 if cpu else 1_000
  config.optimizer.grad_clip_norm = 1.0
  if arg.mixer == "mamba":
    config.optimizer.no_decay_pattern = common.MAMBA_NO_DECAY_PATTERN
  if arg.runlocal:
    common.runlocal_classification(config)
  return config
