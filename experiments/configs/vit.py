r"""ViT on CIFAR-10 (32x32, patch 4) or MNIST, with the token mixer as an argument.

  python -m experiments.run --workdir=/tmp/vit_cifar10 \
      --config=experiments/configs/vit.py:data=cifar10
  python -m experiments.run --workdir=/tmp/vit_mnist \
      --config=experiments/configs/vit.py:data=mnist          # the CPU-sized variant
  python -m experiments.run --workdir=/tmp/vit_agent_cifar10 \
      --config=experiments/configs/vit.py:data=cifar10,mixer=agent   # same backbone, agent mixing

Arguments: data (cifar10 | mnist), mixer (attention | agent | linear | mamba | pooling | window |
biformer; grid mixers use mean pooling), size ("default": ~6.3M parameters on CIFAR-10 (d 256,
8 layers, 8 heads), the tiny CPU model on MNIST; "tiny" forces the tiny model), epochs (0: the
variant's default), seed, runlocal (two steps).

Recipe (`common.image_classification_recipe`, the usual from-scratch small-data recipe, not
the paper's JFT pre-training): AdamW, learning rate 1e-3 with 5 warmup epochs and cosine decay,
weight decay 0.05 (not on biases, normalization scales, positions and the class token),
batch 128, 200 epochs, RandAugment (2 operations, magnitude bin 9 of 30), random crop
(padding 4) and flip, label smoothing 0.1, stochastic depth 0.1. MNIST tiny: d 64, 4 layers,
4 heads, patch 4 (a 7x7 grid), 40 epochs, random crop with padding 2, no RandAugment, weight
decay on every parameter (the MNIST recipe of the runs recorded in
experiments/results/classification.md).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", mixer="attention", size="default", epochs=0, seed=2021,
                  runlocal=False)
  if arg.data not in ("cifar10", "mnist"):
    raise ValueError(f"vit.py trains on cifar10 or mnist, got data={arg.data!r}")
  # runlocal smoke-tests the config with the tiny model (two steps need no big one).
  tiny = arg.data == "mnist" or arg.size == "tiny" or arg.runlocal
  config = base_config()
  config.seed = arg.seed
  grid_mixer = arg.mixer in ("pooling", "window", "biformer", "agent")
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "vit", "mixer": arg.mixer, "patch_size": 4,
      "d_model": 64 if tiny else 256, "num_layers": 4 if tiny else 8,
      "num_heads": 4 if tiny else 8, "mlp_ratio": 4.0,
      "pool": "mean" if grid_mixer or tiny else "cls",
      "dropout": 0.0, "drop_path": 0.0 if tiny else 0.1, "layer_scale_init": 0.0,
      "init": "lecun",
      # A 7x7 MNIST grid: one routing region, 9 agents (a 3x3 pooled grid).
      "agent_num": 9 if tiny else 16, "routing_regions": 1 if tiny else 2,
      "routing_topk": 1 if tiny else 2, "window_size": 7 if arg.data == "mnist" else 4,
  })
  common.image_classification_recipe(config, arg.data,
                                     epochs=arg.epochs or (40 if arg.data == "mnist" else 200))
  if arg.runlocal:
    common.runlocal_classification(config)
  return config
