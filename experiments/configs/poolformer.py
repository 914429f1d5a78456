r"""PoolFormer (MetaFormer, CVPR 2022) on CIFAR-10 or MNIST: pooling as the token mixer.

  python -m experiments.run --workdir=/tmp/poolformer_cifar10 \
      --config=experiments/configs/poolformer.py:data=cifar10
  python -m experiments.run --workdir=/tmp/poolformer_mnist \
      --config=experiments/configs/poolformer.py:data=mnist     # the CPU-sized variant
  python -m experiments.run --workdir=/tmp/metaformer_attention_cifar10 \
      --config=experiments/configs/poolformer.py:data=cifar10,mixer=attention

Arguments: data (cifar10 | mnist), mixer (pooling, or any other mixer: the MetaFormer
comparison), epochs (0: 200 on CIFAR-10, 40 on MNIST), seed, runlocal (two steps).
CIFAR-10: PoolFormer-S12's depths (2, 2, 6, 2) at widths (64, 128, 320, 512) with a stride-2
stem (patch 2: grids 16, 8, 4, 2), GroupNorm(1), LayerScale 1e-5, stochastic depth 0.1; the
training recipe is `common.image_classification_recipe`. MNIST: depths (1, 1, 2) at widths
(32, 64, 128).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", mixer="pooling", epochs=0, seed=2021, runlocal=False)
  # runlocal smoke-tests the config with the tiny model (two steps need no big one).
  tiny = arg.data == "mnist" or arg.runlocal
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "poolformer", "mixer": arg.mixer, "patch_size": 2,
      "depths": (1, 1, 2) if tiny else (2, 2, 6, 2),
      "dims": (32, 64, 128) if tiny else (64, 128, 320, 512),
      "mlp_ratio": 4.0, "dropout": 0.0, "drop_path": 0.0 if tiny else 0.1,
      "layer_scale_init": 1e-5, "init": "lecun", "head_dim": 32,
      # PoolFormer's GroupNorm(1); "layer" gives the other MetaFormers' per-token LayerNorm.
      "norm": "group",
      # Raised when a change to the model's code changes its numbers, so that runs recorded
      # before read as stale (experiments/run_ledger.py). 1: norm before the final pooling.
      "revision": 1,
      "routing_regions": 1 if tiny else 2, "routing_topk": 1 if tiny else 2,
      "agent_num": 9 if tiny else 16,
  })
  common.image_classification_recipe(config, arg.data,
                                     epochs=arg.epochs or (40 if arg.data == "mnist" else 200))
  if arg.runlocal:
    common.runlocal_classification(config)
  return config
