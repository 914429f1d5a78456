r"""Swin Transformer on CIFAR-10 or MNIST: shifted-window attention as the token mixer.

  python -m experiments.run --workdir=/tmp/swin_cifar10 \
      --config=experiments/configs/swin.py:data=cifar10
  python -m experiments.run --workdir=/tmp/swin_mnist \
      --config=experiments/configs/swin.py:data=mnist     # the CPU-sized variant

Arguments: data (cifar10 | mnist), mixer (window, or any other mixer), epochs (0: 200 on
CIFAR-10, 40 on MNIST), seed, runlocal (two steps).
CIFAR-10: Swin-T's depths (2, 2, 6, 2), widths (96, 192, 384, 768) and head width 32 (3, 6, 12,
24 heads), on 2x2 patches (grids 16, 8, 4, 2) with 4x4 windows, stochastic depth 0.2; the
training recipe is `common.image_classification_recipe`. MNIST: depths (2, 2) at widths (32, 64)
on 2x2 patches (grids 14 and 7) with 7x7 windows.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", mixer="window", epochs=0, seed=2021, runlocal=False)
  # runlocal smoke-tests the config with the tiny model (two steps need no big one).
  tiny = arg.data == "mnist" or arg.runlocal
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "swin", "mixer": arg.mixer, "patch_size": 2,
      "depths": (2, 2) if tiny else (2, 2, 6, 2),
      "dims": (32, 64) if tiny else (96, 192, 384, 768),
      "head_dim": 16 if tiny else 32, "window_size": 7 if tiny else 4,
      "mlp_ratio": 4.0, "dropout": 0.0, "drop_path": 0.0 if tiny else 0.2,
      "layer_scale_init": 0.0, "init": "lecun",
      "routing_regions": 1 if tiny else 2, "routing_topk": 1 if tiny else 2,
      "agent_num": 9 if tiny else 16,
      # Raised when a change to the model's code changes its numbers, so that runs recorded
      # before read as stale (experiments/run_ledger.py). 1: norm before the final pooling.
      "revision": 1,
  })
  common.image_classification_recipe(config, arg.data,
                                     epochs=arg.epochs or (40 if arg.data == "mnist" else 200))
  if arg.runlocal:
    common.runlocal_classification(config)
  return config
