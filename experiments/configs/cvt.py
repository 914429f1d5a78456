r"""CvT on CIFAR-10 or MNIST: convolutional token embedding + convolutional projection.

  python -m experiments.run --workdir=/tmp/cvt_cifar10 \
      --config=experiments/configs/cvt.py:data=cifar10
  python -m experiments.run --workdir=/tmp/cvt_mnist \
      --config=experiments/configs/cvt.py:data=mnist          # the CPU-sized variant
  python -m experiments.run --workdir=/tmp/cvt_linear_cifar10 \
      --config=experiments/configs/cvt.py:data=cifar10,mixer=attention   # linear projections

Arguments: data (cifar10 | mnist), mixer (conv_attention, the paper's; or any mixer of
paperzoo.layers.mixers: "attention" is the paper's linear-projection ablation, grid mixers
switch to mean pooling), epochs (0: 200 on CIFAR-10, 40 on MNIST), seed, runlocal (two steps
of the MNIST model with one block per stage).

CIFAR-10: CvT-13 (depths 1, 2, 10; widths 64, 192, 384; head width 64, so 1, 3, 6 heads; MLP
ratio 4; 3x3 depthwise q/k/v projections with BatchNorm, keys and values at stride 2; class
token in the last stage; no positional encoding; 19.6M parameters), with stride-2 token
embeddings (kernels 7, 3, 3; paddings 3, 1, 1) so that 32 x 32 images give 16, 8 and 4 x 4 maps
(the paper's strides 4, 2, 2 are for 224 px). MNIST: depths (1, 2) at widths (32, 64), head
width 16, token embeddings of kernels 5 and 3 at stride 2 (maps 14 and 7; keys/values 7 and 4).
The training recipe is `common.image_classification_recipe` (the paper's ImageNet recipe is
AdamW for 300 epochs).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

GRID_MIXERS = ("pooling", "window", "biformer", "agent")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", mixer="conv_attention", epochs=0, seed=2021,
                  runlocal=False)
  # runlocal smoke-tests the config with the tiny model (two steps need no big one).
  tiny = arg.data == "mnist" or arg.runlocal
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "cvt",
      "mixer": arg.mixer,                                   # the blocks' token mixer
      "depths": (1, 2) if tiny else (1, 2, 10),             # blocks per stage
      "dims": (32, 64) if tiny else (64, 192, 384),         # stage widths
      "embed_kernels": (5, 3) if tiny else (7, 3, 3),       # token-embedding conv kernels
      "embed_strides": (2, 2) if tiny else (2, 2, 2),       # their strides (maps 14, 7 / 16, 8, 4)
      "embed_paddings": (2, 1) if tiny else (3, 1, 1),      # their zero paddings
      "head_dim": 16 if tiny else 64,                       # heads per stage = width / head_dim
      "qkv_kernel": 3,                                      # depthwise q/k/v projection kernel
      "kv_stride": 2,                                       # squeezed keys and values
      "projection_norm": "batch",                           # BatchNorm after the depthwise conv
      # The class token has no place on the grid a grid mixer mixes.
      "pool": "mean" if arg.mixer in GRID_MIXERS else "cls",
      "mlp_ratio": 4.0,                                     # MLP width / stage width
      "dropout": 0.0,                                       # after the mixer and in the MLP
      "drop_path": 0.0 if tiny else 0.1,                    # stochastic depth, rising to this
      "layer_scale_init": 0.0,                              # no LayerScale (0)
      "init": "lecun",                                      # flax's kernel init
      # Keys of swapped-in mixers, sized for the maps (7x7 MNIST, 4x4 last CIFAR-10 stage).
      "agent_num": 9 if tiny else 16, "window_size": 7 if tiny else 4,
      "routing_regions": 1 if tiny else 2, "routing_topk": 1 if tiny else 2,
  })
  common.image_classification_recipe(config, arg.data,
                                     epochs=arg.epochs or (40 if arg.data == "mnist" else 200))
  if arg.runlocal:
    common.runlocal_classification(config)
    config.model.depths = (1, 1)  # compile time grows with depth; two steps test the wiring
  return config
