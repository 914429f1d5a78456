r"""Autoformer (Wu et al., NeurIPS 2021) on long-term forecasting, the paper's hyper-parameters.

  python -m experiments.run --workdir=/tmp/autoformer_etth1_96 \
      --config=experiments/configs/autoformer.py:data=etth1,pred_len=96

Arguments: data (etth1, etth2, exchange, illness, ...), pred_len (96, 192, 336, 720; ILI 24,
36, 48, 60), seq_len (96; ILI 36),
seed (2021), runlocal (two steps at tiny sizes, for smoke tests).

Hyper-parameters from the paper's scripts (thuml/Autoformer
`scripts/ETT_script/Autoformer_ETTh1.sh`, the same in TSLib's
`scripts/long_term_forecast/ETT_script/Autoformer_ETTh1.sh`): label_len 48,
2 encoder layers, 1 decoder layer, factor 3, d_model 512, d_ff 2048, 8 heads, moving average 25,
GELU; dropout 0.05 (thuml/Autoformer's run.py default; TSLib's run.py defaults to 0.1); Adam 1e-4,
batch 32, 10 epochs halving the learning rate each epoch, patience 3 (Sec. 4 of the paper).

The other data sets use the same settings in those scripts, except: Exchange trains one epoch at
horizons 192 and 336 (`--train_epochs 1` in thuml/Autoformer `scripts/Exchange_script/
Autoformer.sh`); ILI (`scripts/ILI_script/Autoformer.sh`) uses lookback 36 and label length 18,
half the lookback (48 at lookback 96).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  config.model = ConfigDict({
      "name": "autoformer",
      "d_model": 512,
      "d_ff": 2048,            # feed-forward hidden width
      "num_heads": 8,
      "encoder_layers": 2,
      "decoder_layers": 1,
      "moving_avg": 25,        # series-decomposition kernel
      "factor": 3,             # k = floor(factor * ln L) Auto-Correlation lags
      "dropout": 0.05,
      "activation": "gelu",
      "init": "torch",         # PyTorch's default initializers, as in the paper's code
  })
  config.optimizer.learning_rate = 1e-4
  if arg.data == "exchange" and arg.pred_len in (192, 336):
    config.train.num_epochs = 1  # the authors' Exchange script
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = 16
    config.model.d_ff = 32
    config.model.num_heads = 2
  return config
