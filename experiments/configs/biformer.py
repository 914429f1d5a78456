r"""BiFormer on CIFAR-10 or MNIST: bi-level routing attention as the token mixer.

  python -m experiments.run --workdir=/tmp/biformer_cifar10 \
      --config=experiments/configs/biformer.py:data=cifar10
  python -m experiments.run --workdir=/tmp/biformer_mnist \
      --config=experiments/configs/biformer.py:data=mnist     # the CPU-sized variant

Arguments: data (cifar10 | mnist), mixer (biformer, or any other mixer), epochs (0: 200 on
CIFAR-10, 40 on MNIST), seed, runlocal (two steps).
CIFAR-10: depths (2, 2, 6, 2) at widths (64, 128, 256, 512) with head width 32 on 2x2 patches
(grids 16, 8, 4, 2), S = 4 regions a side (2 on the last, 2x2 grid), top-k 4. MNIST: depths
(1, 2) at widths (32, 64) on 2x2 patches (grids 14 and 7), S = 7 (regions of 2x2 tokens, then
of one token), top-k 4. The training recipe is `common.image_classification_recipe`.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", mixer="biformer", epochs=0, seed=2021, runlocal=False)
  # runlocal smoke-tests the config with the tiny model (two steps need no big one).
  tiny = arg.data == "mnist" or arg.runlocal
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "biformer", "mixer": arg.mixer, "patch_size": 2,
      "depths": (1, 2) if tiny else (2, 2, 6, 2),
      "dims": (32, 64) if tiny else (64, 128, 256, 512),
      "head_dim": 16 if tiny else 32,
      # S must divide every stage's grid side (it is clamped to sides smaller than S).
      "routing_regions": 7 if arg.data == "mnist" or arg.runlocal else 4, "routing_topk": 4,
      "mlp_ratio": 4.0, "dropout": 0.0, "drop_path": 0.0 if tiny else 0.1,
      "layer_scale_init": 0.0, "init": "lecun", "agent_num": 9 if tiny else 16,
      "window_size": 7 if tiny else 4,
      # Raised when a change to the model's code changes its numbers, so that runs recorded
      # before read as stale (experiments/run_ledger.py). 1: norm before the final pooling.
      "revision": 1,
  })
  common.image_classification_recipe(config, arg.data,
                                     epochs=arg.epochs or (40 if arg.data == "mnist" else 200))
  if arg.runlocal:
    common.runlocal_classification(config)
  return config
