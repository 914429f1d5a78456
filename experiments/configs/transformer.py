r"""The vanilla Transformer (Vaswani et al., 2017) as Time-Series-Library's forecasting baseline.

  python -m experiments.run --workdir=/tmp/transformer_etth1_96 \
      --config=experiments/configs/transformer.py:data=etth1,pred_len=96

Arguments: data (etth1, etth2, exchange, ...), pred_len (96, 192, 336, 720), seq_len (96),
seed (2021), runlocal (two steps at tiny sizes, for smoke tests).

Hyper-parameters from TSLib's scripts (`scripts/long_term_forecast/ETT_script/Transformer_ETTh1.sh`
and run.py defaults): label_len 48, 2 encoder layers, 1 decoder layer, d_model 512, d_ff 2048,
8 heads, dropout 0.1, GELU, timeF time-feature embedding; Adam 1e-4, batch 32, 10 epochs halving
the learning rate each epoch, patience 3 (`common.forecasting_protocol`). On a 2-core CPU one
epoch of ETTh1 takes about 23 minutes (experiments/results/forecasting_speed.md); cap the run
with --config.train.num_epochs=N.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  config.model = ConfigDict({
      "name": "transformer",
      "d_model": 512,
      "d_ff": 2048,              # feed-forward hidden width
      "num_heads": 8,
      "encoder_layers": 2,       # e_layers
      "decoder_layers": 1,       # d_layers
      "dropout": 0.1,
      "activation": "gelu",
      "init": "torch",           # PyTorch's default initializers, as in TSLib
      "attention_impl": "xla",   # see paperzoo.layers.attention
  })
  config.optimizer.learning_rate = 1e-4
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = 16
    config.model.d_ff = 32
    config.model.num_heads = 2
  return config
