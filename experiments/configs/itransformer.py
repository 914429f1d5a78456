r"""iTransformer (Liu et al., ICLR 2024) on long-term forecasting, the paper's hyper-parameters.

  python -m experiments.run --workdir=/tmp/itransformer_etth1_96 \
      --config=experiments/configs/itransformer.py:data=etth1,pred_len=96

Arguments: data (etth1, etth2, exchange, illness, ...), pred_len (96, 192, 336, 720; ILI 24, 36,
48, 60), seq_len (96; ILI 36), seed (2021), runlocal (two steps at tiny sizes, for smoke tests).

Hyper-parameters from the paper's own scripts (thuml/iTransformer,
scripts/multivariate_forecasting): 2 encoder layers, 8 heads, dropout 0.1, GELU, Adam 1e-4,
batch 32, 10 epochs halving the learning rate each epoch, patience 3. d_model = d_ff = 256 on
ETTh1 for horizons 96/192 and 512 for 336/720; 128 on ETTh2 and Exchange. Exchange at horizon
336 trains one epoch (`--train_epochs 1` in `scripts/multivariate_forecasting/Exchange/
iTransformer.sh`).

ILI: neither thuml/iTransformer nor Time-Series-Library has an iTransformer ILI script, so
d_model = d_ff = 512 (TSLib's run.py default d_model) and the protocol above are used; the label
length (unused by the encoder-only model) is half the lookback, 18 at ILI's lookback 36, as TSLib's
ILI scripts pass.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def _width(data: str, pred_len: int) -> int:
  if data == "etth1":
    return 256 if pred_len <= 192 else 512
  if data in ("etth2", "exchange"):
    return 128
  return 512


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  width = _width(arg.data, arg.pred_len)
  config.model = ConfigDict({
      "name": "itransformer",
      "d_model": width,          # token width
      "d_ff": width,             # feed-forward hidden width
      "num_heads": 8,
      "num_layers": 2,           # encoder layers
      "dropout": 0.1,
      "activation": "gelu",
      "use_norm": True,          # instance normalization of each input series
      "init": "torch",           # PyTorch's default Linear init, as in the paper's code
      "attention_impl": "xla",   # see paperzoo.layers.attention
  })
  config.optimizer.learning_rate = 1e-4
  if arg.data == "exchange" and arg.pred_len == 336:
    config.train.num_epochs = 1  # the authors' Exchange script
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = config.model.d_ff = 16
    config.model.num_heads = 2
  return config
