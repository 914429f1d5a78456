r"""S-Mamba (Wang et al., "Is Mamba Effective for Time Series Forecasting?") on ETTh1 long-term
forecasting, the paper's hyper-parameters.

  python -m experiments.run --workdir=/tmp/smamba_etth1_96 \
      --config=experiments/configs/smamba.py:data=etth1,pred_len=96

Arguments: data (etth1 only: the protocol records S-Mamba's settings for ETTh1 alone),
pred_len (96, 192, 336, 720), seq_len (96), seed (2021), runlocal (two steps at tiny sizes, for
smoke tests).

Hyper-parameters from the authors' script (wzhwzhwzh0921/S-D-Mamba,
scripts/multivariate_forecasting/ETT/S_Mamba_ETTh1.sh, via FORECASTING_PROTOCOL.md): 2 encoder
layers, d_model = d_ff = 256, d_state 2, Adam with lr 7e-5 (H 96, 192) or 5e-5 (H 336, 720),
batch 32, 10 epochs halving the learning rate each epoch, patience 3, dropout 0.1, GELU (TSLib
defaults). The Mamba blocks of the released model (models/S_Mamba.py) use d_conv 2 and expand 1
instead of Mamba's defaults (4, 2); we follow the released code.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  if arg.data != "etth1":
    raise ValueError(f"S-Mamba's hyper-parameters are recorded for etth1 only, got "
                     f"data={arg.data!r}")
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  config.model = ConfigDict({
      "name": "smamba",
      "d_model": 256,            # token width
      "d_ff": 256,               # feed-forward hidden width
      "num_layers": 2,           # encoder layers (e_layers)
      "d_state": 2,              # SSM state size per channel
      "d_conv": 2,               # causal conv width, as the released S_Mamba.py
      "expand": 1,               # d_inner = expand * d_model, as the released S_Mamba.py
      "dropout": 0.1,
      "activation": "gelu",
      "use_norm": True,          # instance normalization of each input series
      "init": "torch",           # PyTorch's default Linear init, as in the paper's code
      "scan_impl": "auto",       # Pallas selective scan on GPU, jnp reference elsewhere
  })
  config.optimizer.learning_rate = 7e-5 if arg.pred_len <= 192 else 5e-5
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = config.model.d_ff = 16
  return config
