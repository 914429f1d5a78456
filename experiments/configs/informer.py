r"""Informer (Zhou et al., AAAI 2021) on long-term forecasting, TSLib's hyper-parameters.

  python -m experiments.run --workdir=/tmp/informer_etth1_96 \
      --config=experiments/configs/informer.py:data=etth1,pred_len=96

Arguments: data (etth1, etth2, exchange, ...), pred_len (96, 192, 336, 720), seq_len (96),
seed (2021), runlocal (two steps at tiny sizes, for smoke tests).

Hyper-parameters of TSLib's `scripts/long_term_forecast/ETT_script/Informer_ETTh1.sh` (see
experiments/forecasting_protocol.md): seq_len 96, label_len 48, 2 encoder layers,
1 decoder layer, factor 3 (the paper's own scripts use its default c = 5, the model's default
here), d_model 512, d_ff 2048, 8 heads (run.py default), distilling on, GELU (TSLib's default
activation); dropout 0.05 (the original Informer code's default; TSLib's run.py defaults to
0.1); timeF time features; Adam 1e-4, batch 32, 10 epochs halving the learning rate each
epoch, patience 3 (`common.forecasting_protocol`). Cross-attention is full attention, as the
paper and the original code (TSLib's model uses ProbSparse there: model.cross_attention).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=96, pred_len=96, seed=2021, runlocal=False)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=arg.seq_len, pred_len=arg.pred_len)
  config.model = ConfigDict({
      "name": "informer",
      "d_model": 512,
      "d_ff": 2048,              # feed-forward hidden width
      "num_heads": 8,
      "encoder_layers": 2,
      "decoder_layers": 1,
      "factor": 3,               # u = factor * ceil(ln L_Q) active queries, as many sampled keys
      "distil": True,            # conv + BatchNorm + ELU + max-pool between encoder layers
      "cross_attention": "full",  # "full" (paper) | "probsparse" (TSLib)
      "dropout": 0.05,
      "activation": "gelu",
      "init": "torch",           # PyTorch's default initializers, as in the paper's code
  })
  config.optimizer.learning_rate = 1e-4
  if arg.runlocal:
    common.runlocal(config)
    config.model.d_model = 16
    config.model.d_ff = 32
    config.model.num_heads = 2
  return config
