r"""T2T-ViT on CIFAR-10 or MNIST: Tokens-to-Token soft splits, then a deep-narrow ViT.

  python -m experiments.run --workdir=/tmp/t2t_vit_cifar10 \
      --config=experiments/configs/t2t_vit.py:data=cifar10
  python -m experiments.run --workdir=/tmp/t2t_vit_mnist \
      --config=experiments/configs/t2t_vit.py:data=mnist      # the CPU-sized variant

Arguments: data (cifar10 | mnist), mixer (the backbone's token mixer: attention, or any mixer
of paperzoo.layers.mixers; grid mixers switch to mean pooling), epochs (0: 200 on CIFAR-10, 40
on MNIST), seed, runlocal (two steps of the MNIST model with a 2-layer backbone).

Soft splits: kernels (5, 3, 3), strides (2, 2, 1), paddings (2, 1, 1), two T2T layers of width
64 (1 head, MLP ratio 1, the paper's); total stride 4, so CIFAR-10 gives 16, 8, 8 x 8 = 64 and
MNIST 14, 7, 7 x 7 = 49 tokens, the ViT configs' grids (the paper's strides 4, 2, 2 are for 224
px and would leave 2 x 2 tokens). CIFAR-10 backbone: T2T-ViT-12 (width 256, 12 layers, 4
heads, MLP ratio 2; 6.6M parameters here, the size of the ViT config), class token, sinusoidal
positions, stochastic depth 0.1. MNIST: width 64, 6 layers, 4 heads, MLP ratio 2, T2T width 32.
The training recipe is `common.image_classification_recipe`.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

GRID_MIXERS = ("pooling", "window", "biformer", "agent")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", mixer="attention", epochs=0, seed=2021, runlocal=False)
  # runlocal smoke-tests the config with the tiny model (two steps need no big one).
  tiny = arg.data == "mnist" or arg.runlocal
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "t2t_vit",
      "t2t_kernels": (5, 3, 3),                 # soft-split kernels k
      "t2t_strides": (2, 2, 1),                 # soft-split strides s (total stride 4)
      "t2t_paddings": (2, 1, 1),                # soft-split zero paddings p
      "t2t_dim": 32 if tiny else 64,            # width of the two T2T layers
      "t2t_heads": 1,                           # heads of the T2T layers' attention
      "t2t_mlp_ratio": 1.0,                     # MLP width / t2t_dim in the T2T layers
      "mixer": arg.mixer,                       # the backbone's token mixer
      "d_model": 64 if tiny else 256,           # backbone width (narrow)
      "num_layers": 6 if tiny else 12,          # backbone depth (deep)
      "num_heads": 4,                           # backbone heads
      "mlp_ratio": 2.0,                         # backbone MLP width / d_model
      # The class token has no place on the grid a grid mixer mixes.
      "pool": "mean" if arg.mixer in GRID_MIXERS else "cls",
      "positions": "sinusoidal",                # fixed positions, as the paper
      "dropout": 0.0,                           # after the mixer, in the MLP, on embeddings
      "drop_path": 0.0 if tiny else 0.1,        # stochastic depth, rising to this
      "layer_scale_init": 0.0,                  # no LayerScale (0)
      "init": "lecun",                          # flax's kernel init
      # Keys of swapped-in mixers, sized for the token grid (7x7 MNIST, 8x8 CIFAR-10).
      "agent_num": 9 if tiny else 16, "window_size": 7 if tiny else 4,
      "routing_regions": 1 if tiny else 2, "routing_topk": 1 if tiny else 2,
  })
  common.image_classification_recipe(config, arg.data,
                                     epochs=arg.epochs or (40 if arg.data == "mnist" else 200))
  if arg.runlocal:
    common.runlocal_classification(config)
    config.model.num_layers = 2  # compile time grows with depth; two steps test the wiring
  return config
