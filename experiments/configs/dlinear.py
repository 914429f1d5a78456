r"""DLinear (Zeng et al., AAAI 2023): series decomposition and two linear maps over time.

  python -m experiments.run --workdir=/tmp/dlinear_etth1_96 \
      --config=experiments/configs/dlinear.py:data=etth1,pred_len=96

Arguments: data (etth1, etth2, exchange, illness, ...), pred_len, seq_len (96; the paper's
native lookback is 336, its ILI runs use 104), seed (2021), runlocal (two steps, smoke tests).

Hyper-parameters from the paper's scripts (cure-lab/LTSF-Linear,
scripts/EXP-LongForecasting/Linear/; see experiments/forecasting_protocol.md): moving average
25, heads shared across channels, batch 32 and Adam with learning rate 0.005 on ETTh1, 0.05 on
ETTh2, 0.0005 with batch 8 on Exchange (the script's batch at H 96 and 192; it passes 32 at
H 336 and 720), 0.01 on ILI; 10 epochs halving the rate each epoch, patience 3.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

# data set -> (learning rate, batch size) from the paper's scripts.
_OPTIMIZATION = {
    "etth1": (0.005, 32),
    "etth2": (0.05, 32),
    "exchange": (0.0005, 8),
    "illness": (0.01, 32),
}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  config.model = ConfigDict({
      "name": "dlinear",
      "moving_avg": 25,     # kernel of the moving average that extracts the trend
      "individual": False,  # one linear map per channel (True) or one shared (False)
      "init": "torch",      # bias init; the weights start at 1/seq_len as in the paper's code
  })
  learning_rate, batch_size = _OPTIMIZATION.get(arg.data, (0.005, 32))
  config.optimizer.learning_rate = learning_rate
  config.train.batch_size = batch_size
  if arg.runlocal:
    common.runlocal(config)
  return config
