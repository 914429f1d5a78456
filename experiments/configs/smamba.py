r"""S-Mamba (Wang et al., "Is Mamba Effective for Time Series Forecasting?") on long-term
forecasting, the paper's hyper-parameters.

  python -m experiments.run --workdir=/tmp/smamba_etth1_96 \
      --config=experiments/configs/smamba.py:data=etth1,pred_len=96

Arguments: data (etth1, etth2, exchange: the data sets with an authors' script), pred_len (96,
192, 336, 720), seq_len (96), seed (2021), runlocal (two steps at tiny sizes, for smoke tests).

Hyper-parameters from the authors' script (wzhwzhwzh0921/S-D-Mamba,
scripts/multivariate_forecasting/ETT/S_Mamba_ETTh1.sh; see experiments/forecasting_protocol.md):
2 encoder layers, d_model = d_ff = 256, d_state 2, Adam with lr 7e-5 (H 96, 192) or 5e-5 (H 336,
720), batch 32, 10 epochs halving the learning rate each epoch, patience 3, dropout 0.1, GELU
(TSLib defaults). The Mamba blocks of the released model (models/S_Mamba.py) use d_conv 2 and
expand 1 instead of Mamba's defaults (4, 2); we follow the released code.

The authors' other scripts change only these (wzhwzhwzh0921/S-D-Mamba, scripts/
multivariate_forecasting/):
- ETTh2 (`ETT/S_Mamba_ETTh2.sh`): lr 4e-5 (H 96, 192), 3e-5 (H 336), 7e-5 (H 720).
- Exchange (`Exchange/S_Mamba.sh`): d_model = d_ff = 128, d_state 32 (run.py's default: the
  script passes none), lr 1e-4 (H 96, 192) or 5e-5 (H 336, 720), batch 16 at H 96.
There is no ILI script (the paper does not evaluate ILI), so other data sets are refused.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  if arg.data not in ("etth1", "etth2", "exchange"):
    raise ValueError(f"S-Mamba's hyper-parameters are recorded for etth1, etth2 and exchange "
                     f"only (the authors' scripts), got data={arg.data!r}")
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
  if arg.data == "etth2":
    config.optimizer.learning_rate = {96: 4e-5, 192: 4e-5, 336: 3e-5, 720: 7e-5}.get(
        arg.pred_len, 4e-5)
  elif arg.data == "exchange":
    config.model.update(d_model=128, d_ff=128, d_state=32)
    config.optimizer.learning_rate = 1e-4 if arg.pred_len <= 192 else 5e-5
    if arg.pred_len == 96:
      config.train.batch_size = 16
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = config.model.d_ff = 16
  return config
