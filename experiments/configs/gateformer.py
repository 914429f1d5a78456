r"""Gateformer (Lan & Oermann, 2025) on long-term forecasting, the authors' hyper-parameters.

  python -m experiments.run --workdir=/tmp/gateformer_etth1_96 \
      --config=experiments/configs/gateformer.py:data=etth1,pred_len=96

Arguments: data (etth1, exchange, ...), pred_len (96, 192, 336, 720), seq_len (96), seed (2021),
runlocal (two steps at tiny sizes, for smoke tests).

Hyper-parameters from the authors' released scripts (nyuolab/Gateformer
`scripts/multivariate_forecasting/ETT/Gateformer_ETTh1.sh`, `.../Exchange/Gateformer.sh`; see
experiments/forecasting_protocol.md): batch 8, 4 heads, d_ff = d_model, patch length = stride
= 8, dropout 0.1, 10 epochs halving the learning rate each epoch, patience 3 (their run.py
defaults, the TSLib protocol). Per data set and horizon (d_model, layers per encoder, learning
rate):

  ETTh1     96: (64, 1, 1e-4)   192: (64, 2, 5e-4)   336: (128, 2, 5e-4)   720: (64, 2, 5e-4)
  Exchange  96: (64, 1, 1e-4)   192: (64, 1, 1e-3)   336: (64, 1, 1e-4)    720: (128, 2, 1e-3)

These are smaller than iTransformer's (d_model 256-512, batch 32): the paper publishes its own
settings, so they are used as they are. Other data sets fall back to the ETTh1 settings (not
tuned).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

# (d_model, num_layers, learning_rate) per data set and pred_len, from the authors' scripts.
_SETTINGS = {
    "etth1": {96: (64, 1, 1e-4), 192: (64, 2, 5e-4), 336: (128, 2, 5e-4), 720: (64, 2, 5e-4)},
    "exchange": {96: (64, 1, 1e-4), 192: (64, 1, 1e-3), 336: (64, 1, 1e-4),
                 720: (128, 2, 1e-3)},
}


def _settings(data: str, pred_len: int) -> tuple[int, int, float]:
  table = _SETTINGS.get(data, _SETTINGS["etth1"])
  if pred_len in table:
    return table[pred_len]
  # An unlisted horizon takes the nearest listed one's settings.
  return table[min(table, key=lambda h: abs(h - pred_len))]


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  d_model, num_layers, learning_rate = _settings(arg.data, arg.pred_len)
  config.model = ConfigDict({
      "name": "gateformer",
      "d_model": d_model,        # token width of both stages
      "d_ff": d_model,           # feed-forward hidden width
      "num_heads": 4,
      "num_layers": num_layers,  # layers of each encoder (temporal and variate-wise)
      "patch_len": 8,
      "stride": 8,
      "dropout": 0.1,
      "activation": "relu",      # PyTorch nn.TransformerEncoderLayer's default, as released
      "norm_first": True,        # pre-norm encoder layers, no final LayerNorm
      "use_norm": True,          # instance normalization of each input series
      "init": "torch",           # PyTorch's default initializers
      "attention_impl": "xla",   # see paperzoo.layers.attention
  })
  config.train.batch_size = 8
  config.optimizer.learning_rate = learning_rate
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = config.model.d_ff = 16
    config.model.num_heads = 2
  return config
