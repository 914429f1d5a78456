r"""VAR (Tian et al., NeurIPS 2024): class-conditional next-scale prediction over the token maps
of a frozen multi-scale VQ tokenizer trained by this project. Two stages, each one trainer run.

  # MNIST on a CPU: the tokenizer, then VAR-tiny on its tokens
  python -m experiments.run --workdir=/tmp/var_tokenizer_mnist \
      --config=experiments/configs/var_tokenizer.py:data=mnist
  python -m experiments.run --workdir=/tmp/var_mnist \
      --config=experiments/configs/var.py:data=mnist,tokenizer_workdir=/tmp/var_tokenizer_mnist
  # CIFAR-10 32x32 on a GPU: the tokenizer, then VAR-S (DiT-S's shape)
  python -m experiments.run --workdir=/tmp/var_tokenizer_cifar10 \
      --config=experiments/configs/var_tokenizer.py:data=cifar10
  python -m experiments.run --workdir=/tmp/var_cifar10 \
      --config=experiments/configs/var.py:data=cifar10,tokenizer_workdir=/tmp/var_tokenizer_cifar10

Arguments: data (mnist | cifar10), size ("" = tiny on MNIST, S on CIFAR-10; tiny | S | d12 |
d16), tokenizer_workdir ("" = /tmp/var_tokenizer_<data>, the commands above), train_tokenizer
(train the tokenizer there first if it holds no finished run, so one command does both stages),
guidance (-1 = the variant's scale; 0 = none), schedule (guidance over scales: linear (VAR) |
constant), top_k, top_p (-1 = the variant's), steps (0 = the variant's), seed, runlocal.

Model (`paperzoo.models.var`), task (`paperzoo.tasks.next_scale`): teacher forcing over all
scales in one pass under the block-causal mask, cross-entropy per token; after training
`samples_per_class` samples per class with the KV-cached sampler, scored by the data set's
reference classifier (`paperzoo.generation.metrics`), guided and unguided.

MNIST recipe (CPU): VAR-tiny narrowed to 4 blocks of width 64 (4 heads; 335k parameters) over
the tokenizer's 130 tokens (scales 1, 2, 3, 4, 6, 8; codebook 256), class dropout 0.1, AdamW
(VAR's b2 0.95 and weight decay 0.05) lr 2e-3 with 100 warmup steps and cosine decay to 0.1x,
batch 32, gradient clipping at 2 (VAR's), EMA 0.995, 800 steps (3.6 epochs) with validation every
400; then 50 samples per class with constant guidance 2 and top-p 0.9, scored with the
reference MNIST classifier. Measured with the default seed 2021 through `python -m
experiments.reproduce generation --entries=mnist/var --seeds=1` (2026-11-23, 2 CPU cores shared
with one other training run): guided class accuracy 96.0%, 71.0% without guidance; tokenizer
177 s and VAR 560 s (compile + train + eval) plus 32 s of sampling
(experiments/results/generation.md). Earlier, with seed 0 (the default then; 2 CPU cores
shared with ~6 other jobs, 938 s of training): validation NLL 1.92 nats/token, token accuracy 47%; guided class accuracy 95.6%
(67% without guidance). Sampling settings on that checkpoint, all without top-p: constant
guidance 1 / 2 / 3: 89.6 / 91.6 / 90.6%; VAR's linear ramp 2 / 4: 90.8 / 93.8% (a throwaway
sampling sweep on that checkpoint, not kept in the repo).
CIFAR-10 recipe (GPU, not run yet): VAR-S, AdamW lr 4e-4 (VAR's base rate is 1e-4 per 256
images; a small model takes more; untuned), b2 0.95, weight decay 0.05 (not on biases,
normalization scales and the position and level tables), batch 256, EMA 0.9999,
100,000 steps, guidance 1.5 on VAR's linear schedule, top-k 225 (VAR's 900 of 4096, 22% of the
codebook) and top-p 0.96 (VAR's sampling settings), 1,000 samples per class.

runlocal: a 2-block width-32 VAR on the tokens of a tiny tokenizer that the task trains once
(two steps of `var_tokenizer.py:runlocal`, ~15 s) into cache_dir("var_tokenizers")/runlocal_<hash>
and reuses afterwards (`task.tokenizer_config="runlocal"`; the tokenizer_workdir argument is
ignored); two steps of batch 8; `samples_per_class=0`, so no sample scores and no reference
classifier is ever trained.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

DATA_SETS = ("mnist", "cifar10")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="mnist", size="", tokenizer_workdir="", train_tokenizer=False,
                  guidance=-1.0, schedule="", top_k=-1, top_p=-1.0, steps=0, seed=2021,
                  runlocal=False)
  if arg.data not in DATA_SETS:
    raise ValueError(f"var.py generates {' or '.join(DATA_SETS)}, got data={arg.data!r}")
  mnist = arg.data == "mnist"
  config = base_config()
  config.seed = arg.seed
  config.data = common.classification_data(arg.data)

  config.task = ConfigDict({
      "name": "next_scale",
      "tokenizer_workdir": arg.tokenizer_workdir or f"/tmp/var_tokenizer_{arg.data}",
      "tokenizer_config": f"data={arg.data}" if arg.train_tokenizer else "",
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
    config.task.update(tokenizer_workdir="", tokenizer_config="runlocal", samples_per_class=0,
                       sample_batch_size=16)
    config.model.update(size="tiny", depth=2, width=32, heads=2)
  return config
