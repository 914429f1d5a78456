r"""VAR (Tian et al., NeurIPS 2024): class-conditional next-scale prediction over the token maps
of a frozen multi-scale VQ tokenizer trained by this project. Two stages, each one trainer run;
`experiments.run` trains the tokenizer first when it is missing (`experiments.prerequisites`).

  # MNIST on a CPU: the tokenizer (in the cache, unless tokenizer_workdir says where), then
  # VAR-tiny on its tokens
  python -m experiments.run --workdir=/tmp/var_mnist \
      --config=experiments/configs/var.py:data=mnist
  # the same two stages by hand, the tokenizer in a workdir of your choice
  python -m experiments.run --workdir=/tmp/var_tokenizer_mnist \
      --config=experiments/configs/var_tokenizer.py:data=mnist,seed=2021
  python -m experiments.run --workdir=/tmp/var_mnist \
      --config=experiments/configs/var.py:data=mnist,tokenizer_workdir=/tmp/var_tokenizer_mnist
  # CIFAR-10 32x32 on a GPU: VAR-S (DiT-S's shape) on a CIFAR-10 tokenizer
  python -m experiments.run --workdir=/tmp/var_cifar10 \
      --config=experiments/configs/var.py:data=cifar10

Arguments: data (mnist | cifar10), size ("" = tiny on MNIST, S on CIFAR-10; tiny | S | d12 |
d16), tokenizer_workdir (the var_tokenizer run to read; "" = the cache folder of the tokenizer
config `var_tokenizer.py:data=<data>,seed=<seed>`, trained there by `experiments.run` when
missing), guidance (-1 = the variant's scale; 0 = none), schedule (guidance over scales: linear
(VAR) | constant), top_k, top_p (-1 = the variant's), steps (0 = the variant's), seed, runlocal.

Model (`paperzoo.models.var`), task (`paperzoo.tasks.next_scale`): teacher forcing over all
scales in one pass under the block-causal mask, cross-entropy per token; after training
`samples_per_class` samples per class with the KV-cached sampler, scored by the data set's
reference classifier (`paperzoo.generation.metrics`), guided and unguided.

MNIST recipe (CPU): VAR-tiny narrowed to 4 blocks of width 64 (4 heads; 335k parameters) over
the tokenizer's 130 tokens (scales 1, 2, 3, 4, 6, 8; codebook 256), class dropout 0.1, AdamW
(VAR's b2 0.95 and weight decay 0.05) lr 2e-3 with 100 warmup steps and cosine decay to 0.1x,
batch 32, gradient clipping at 2 (VAR's), EMA 0.995, 800 steps (3.6 epochs) with validation every
400; then 50 samples per class with constant guidance 2 and top-p 0.9, scored with the
reference MNIST classifier. Results and their commands: experiments/results/generation.md (and
generation_notes.md there: the sampling settings that chose guidance 2 and top-p 0.9).
CIFAR-10 recipe (GPU): VAR-S, AdamW lr 4e-4 (VAR's base rate is 1e-4 per 256 images; a small
model takes more; untuned), b2 0.95, weight decay 0.05 (not on biases, normalization scales and
the position and level tables), batch 256, EMA 0.9999, 100,000 steps, guidance 1.5 on VAR's
linear schedule, top-k 225 (VAR's 900 of 4096, 22% of the codebook) and top-p 0.96 (VAR's
sampling settings), 1,000 samples per class.

runlocal: a 2-block width-32 VAR on the tokens of a two-step tokenizer
(`var_tokenizer.py:...,runlocal`, trained once into the cache and reused); two steps of batch
8; `samples_per_class=0`, so no sample scores and no reference classifier.
"""

from experiments import prerequisites
from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

DATA_SETS = ("mnist", "cifar10")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="mnist", size="", tokenizer_workdir="", guidance=-1.0, schedule="",
                  top_k=-1, top_p=-1.0, steps=0, seed=2021, runlocal=False)
  if arg.data not in DATA_SETS:
    raise ValueError(f"var.py generates {' or '.join(DATA_SETS)}, got data={arg.data!r}")
  mnist = arg.data == "mnist"
  config = base_config()
  config.seed = arg.seed
  config.data = common.classification_data(arg.data)

  config.task = ConfigDict({
      "name": "next_scale",
      # The var_tokenizer run to read, and the var_tokenizer.py argument that trains it: set
      # below, once runlocal has chosen the data.
      "tokenizer_workdir": "",
      "tokenizer_config": "",
      "guidance_scale": arg.guidance if arg.guidance >= 0 else (2.0 if mnist else 1.5),
      "guidance_schedule": arg.schedule or ("constant" if mnist else "linear"),
      "top_k": arg.top_k if arg.top_k >= 0 else (0 if mnist else 225),
      "top_p": arg.top_p if arg.top_p >= 0 else (0.9 if mnist else 0.96),
      "temperature": 1.0,
      "samples_per_class": 50 if mnist else 1000,
      "sample_batch_size": 250 if mnist else 1000,
      "sample_seed": 0,
      # FID's Inception weights (.npz; how to get them: paperzoo/generation/inception.py); a
      # path adds standard FID to the final metrics, "" = off (no such weights offline).
      "inception_weights": "",
      **common.reference_classifier(arg.data, runlocal=arg.runlocal),
  })

  size = arg.size or ("tiny" if mnist else "S")
  narrow = mnist and size == "tiny"  # the CPU model: tiny narrowed to fit ~15 minutes
  config.model = ConfigDict({
      "name": "var", "size": size,
      # 0 keeps the size's value.
      "depth": 4 if narrow else 0,
      "width": 64 if narrow else 0,
      "heads": 4 if narrow else 0,
      "mlp_ratio": 4.0,
      "class_dropout_prob": 0.1,
      "dropout": 0.0,
      "attention_dropout": 0.0,
      "attention_impl": "xla",
      "norm_eps": 1e-6,
  })

  config.train.batch_size = 32 if mnist else 256
  config.train.eval_batch_size = 500 if mnist else 1000
  config.train.num_steps = arg.steps or (800 if mnist else 100_000)
  config.train.eval_every_steps = 400 if mnist else 5_000
  config.train.patience = 0
  config.train.ema_decay = 0.995 if mnist else 0.9999
  config.train.log_every_steps = 50 if mnist else 500
  config.train.checkpoint_every_steps = 0 if mnist else 5_000
  config.optimizer.name = "adamw"
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.05
  config.optimizer.learning_rate = 2e-3 if mnist else 4e-4
  config.optimizer.warmup_steps = 100 if mnist else 2_000
  config.optimizer.schedule = "cosine"
  config.optimizer.min_lr_ratio = 0.1
  config.optimizer.grad_clip_norm = 2.0
  if not mnist:
    # VAR keeps biases, normalization scales and the position and level tables out of weight
    # decay. The MNIST recipe, whose runs are recorded, still decays every parameter.
    config.optimizer.decay_vectors = False
    config.optimizer.no_decay_pattern = "position_table|level_table"

  if arg.runlocal:
    common.runlocal(config)
    config.data = common.classification_data("mnist")
    config.train.ema_decay = 0.0
    config.task.update(samples_per_class=0, sample_batch_size=16)
    config.model.update(size="tiny", depth=2, width=32, heads=2)

  # VAR seed s reads the tokenizer of seed s (the generation grid pairs them the same way).
  tokenizer = f"data={config.data.name},seed={arg.seed}" + (",runlocal" if arg.runlocal else "")
  config.task.tokenizer_config = tokenizer
  config.task.tokenizer_workdir = arg.tokenizer_workdir or str(
      prerequisites.cached_workdir("var_tokenizers", "var_tokenizer", tokenizer))
  return config
