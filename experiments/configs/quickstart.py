r"""Quickstart: a small iTransformer on a generated series; no data files, under two minutes.

  python -m experiments.run --config=experiments/configs/quickstart.py --workdir=/tmp/quickstart

The `synthetic` data set is generated in memory (daily and weekly cycles, a trend and noise on
seven variates; see paperzoo.data.forecasting), split and scaled like the real benchmarks.
Arguments: seed (2021), runlocal (two steps, for smoke tests).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data("synthetic", seq_len=96, pred_len=24)
  config.model = ConfigDict({
      "name": "itransformer",
      "d_model": 64, "d_ff": 64, "num_heads": 4, "num_layers": 2, "dropout": 0.1,
      "activation": "gelu", "use_norm": True, "init": "torch", "attention_impl": "xla",
  })
  config.optimizer.learning_rate = 1e-3
  config.train.num_epochs = 5
  config.train.log_every_steps = 20
  if arg.runlocal:
    common.runlocal(config)
  return config
