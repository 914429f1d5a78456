r"""Agent Attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024) on CIFAR-10 or MNIST: the one-line mixer swap `mixer="agent"`.

  python -m experiments.run --workdir=/tmp/agent_swin_cifar10 \
      --config=experiments/configs/agent.py:data=cifar10
  python -m experiments.run --workdir=/tmp/agent_swin_mnist \
      --config=experiments/configs/agent.py:data=mnist         # the CPU-sized variant
  python -m experiments.run --workdir=/tmp/agent_vit_cifar10 \
      --config=experiments/configs/agent.py:data=cifar10,backbone=vit

Agent attention is the token mixer "agent" of paperzoo.layers.mixers (equations there): n agent
tokens A = pool(Q) (adaptive average pooling of the query map to sqrt(n) x sqrt(n)) first
aggregate, V_A = softmax(A K^T / sqrt(d) + B_1) V, then broadcast, O = softmax(Q A^T / sqrt(d)
+ B_2) V_A + DWC(V), with DWC a 3x3 depthwise convolution of V (always on: the mixer has no
switch for it). Nothing else changes: this config is the backbone's own config with
`mixer="agent"` (and `agent_num`), so the comparison with the softmax backbone is one line.

The default backbone is Swin (Agent-Swin): agent attention replaces the window attention of
every stage, so each token sees the whole map at a cost linear in the number of tokens N. On 32
px images the hierarchical backbone's first stage is where tokens are many (16 x 16 on CIFAR-10,
14 x 14 on MNIST, against n = 16 or 9 agents), the regime the paper targets; an isotropic ViT
has only 8 x 8 or 7 x 7 tokens. `backbone=vit` is Agent-DeiT's setting (global softmax attention
replaced in an isotropic ViT; the same model as `vit.py:mixer=agent`). The backbone's sizes and
the training recipe are those of experiments/configs/swin.py / vit.py. The paper's relative
position biases per stage are simplified in the mixer (see its docstring).

Arguments: data (cifar10 | mnist), backbone (swin | vit), agent_num (n, a perfect square; 0:
9 on MNIST, a 3x3 pooled grid, and 16 on CIFAR-10, a 4x4 pooled grid), epochs (0: the
backbone config's), seed, runlocal (two steps of the MNIST model, one block per stage / two
layers).
"""

from experiments.configs import swin, vit
from paperzoo.config import ConfigDict, parse_arg

BACKBONES = {"swin": swin, "vit": vit}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="cifar10", backbone="swin", agent_num=0, epochs=0, seed=2021,
                  runlocal=False)
  if arg.backbone not in BACKBONES:
    raise ValueError(f"agent.py swaps the mixer of a backbone config; valid backbones: "
                     f"{', '.join(BACKBONES)}, got backbone={arg.backbone!r}")
  backbone_arg = f"data={arg.data},mixer=agent,epochs={arg.epochs},seed={arg.seed}"
  config = BACKBONES[arg.backbone].get_config(backbone_arg + (",runlocal" if arg.runlocal
                                                               else ""))
  tiny = arg.data == "mnist" or arg.runlocal
  # n agents, pooled from the query map to a sqrt(n) x sqrt(n) grid.
  config.model.agent_num = arg.agent_num or (9 if tiny else 16)
  if arg.runlocal:  # compile time grows with depth; two steps test the wiring
    if arg.backbone == "swin":
      config.model.depths = (1, 1)
    else:
      config.model.num_layers = 2
  return config
