"""PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022).

A hierarchical MetaFormer whose token mixer is pooling, Eq. 4 of the paper:

    T' = AvgPool_{3x3, stride 1, count_include_pad=False}(Norm(T)) - Norm(T)

(the subtraction because the block adds the input back), with the paper's other choices: an
overlapping stem (kernel 7, stride 4, padding 2 at patch 4), a 3x3 stride-2 convolution
between stages, LayerScale, stochastic depth, and GroupNorm with one group (statistics over
the whole token grid; `model.norm="group"` in experiments/configs/poolformer.py), also before
the final average pooling. With `norm="layer"` the blocks use the per-token LayerNorm of the
other MetaFormers.

Config keys (`config.model`): depths ((2, 2, 6, 2) is PoolFormer-S12), dims ((64, 128, 320,
512)), patch_size (4), mixer ("pooling"; any mixer of paperzoo.layers.mixers swaps in),
pool_size (3), mlp_ratio (4), drop_path (0.1), layer_scale_init (0 here: off; the config
sets the paper's 1e-5), norm ("layer" here; the config sets "group"), dropout (0.0),
init ("lecun"). Input {"inputs": float [B, H, W, C]}; logits [B, num_classes].
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from paperzoo.layers.metaformer import HierarchicalBackbone
from paperzoo.registry import MODELS


@MODELS.register("poolformer")
class PoolFormer(HierarchicalBackbone):

  def __init__(self, config: Any, *, num_classes: int, input_shape: tuple[int, ...],
               vocab_size: int = 0, rngs: nnx.Rngs):
    del vocab_size
    super().__init__(config, num_classes=num_classes, input_shape=input_shape,
                     mixer=config.get("mixer", "pooling"), downsample="conv",
                     stem_overlap=True, stem_norm=False, rngs=rngs)
