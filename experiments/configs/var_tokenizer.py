r"""VAR's multi-scale residual VQ tokenizer on MNIST (padded to 32x32) or CIFAR-10 32x32.

  python -m experiments.run --workdir=/tmp/var_tokenizer_mnist \
      --config=experiments/configs/var_tokenizer.py:data=mnist
  python -m experiments.run --workdir=/tmp/var_tokenizer_cifar10 \
      --config=experiments/configs/var_tokenizer.py:data=cifar10

Arguments: data (mnist | cifar10), scales ("1-2-3-4-6-8": the token-map sides, the last the
latent side 8), codebook_size (0: the data set's default, MNIST 256, CIFAR-10 1024),
codebook_update (ema | loss), epochs (0: the data set's default), seed, runlocal (two steps
with a tiny model).

Model (`paperzoo.models.var_tokenizer`): encoder widths (16, 32, 64) without residual blocks on
MNIST (sized for ten minutes on two busy CPU cores) and (64, 128, 128) with one residual block
per resolution on CIFAR-10, two stride-2 stages (32 -> 8), latent dimension 32 (VAR's), scales
1, 2, 3, 4, 6, 8 (VAR's schedule ends 8, 10, 13, 16 at 256 px; at 8x8 latents this is the
catalogue's choice), one shared codebook with EMA updates and dead-code restarts after 50
steps unused, beta 0.25, 4 shared phi convolutions with residual ratio 0.5, bicubic
upsampling. Task (`paperzoo.tasks.tokenizer`): L2 reconstruction + VQ losses (no perceptual or
GAN loss), selection on validation PSNR. Recipe: Adam, learning rate 1e-3 with 50 warmup steps
and cosine decay to 1e-4, batch 64, gradient clipping at 1; MNIST 3 epochs (336 steps),
CIFAR-10 30 epochs.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

DATA_SETS = ("mnist", "cifar10")


def parse_scales(text: str) -> tuple[int, ...]:
  """"1-2-3-4-6-8" -> (1, 2, 3, 4, 6, 8) (a comma would split the config argument)."""
  try:
    return tuple(int(s) for s in text.split("-"))
  except ValueError:
    raise ValueError(f"scales={text!r} must be sides joined by '-', e.g. 1-2-3-4-6-8") from None


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="mnist", scales="1-2-3-4-6-8", codebook_size=0,
                  codebook_update="ema", epochs=0, seed=2021, runlocal=False)
  if arg.data not in DATA_SETS:
    raise ValueError(f"var_tokenizer.py trains on {' or '.join(DATA_SETS)}, got "
                     f"data={arg.data!r}")
  mnist = arg.data == "mnist"
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      "name": "var_tokenizer",
      "channels": (16, 32, 64) if mnist else (64, 128, 128),
      # MNIST: plain conv stacks, so that ten CPU minutes see a few epochs.
      "num_res_blocks": 0 if mnist else 1,
      "latent_dim": 32,
      "padded_size": 32 if mnist else 0,
      "scales": parse_scales(arg.scales),
      "codebook_size": arg.codebook_size or (256 if mnist else 1024),
      "beta": 0.25,
      "codebook_update": arg.codebook_update,
      "ema_decay": 0.99,
      "restart_after_steps": 50,
      "usage_window": 50,
      "num_phi": 4,
      "phi_residual_ratio": 0.5,
      "upsample": "bicubic",
  })
  config.data = common.classification_data(arg.data)
  config.task = ConfigDict({"name": "tokenizer", "reconstruction_loss": "l2"})
  config.train.batch_size = 64
  config.train.eval_batch_size = 500
  config.train.num_epochs = arg.epochs or (3 if mnist else 30)
  config.train.patience = 0
  config.train.log_every_steps = 50
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.min_lr_ratio = 0.1
  config.optimizer.grad_clip_norm = 1.0
  if arg.runlocal:
    common.runlocal(config)
    config.data = common.classification_data("mnist")  # CIFAR-10's 15,000 held-out: minutes
    config.model.update(channels=(8, 16, 16), num_res_blocks=0, latent_dim=8, padded_size=32,
                        codebook_size=arg.codebook_size or 32)
  return config
