r"""PatchTST (Nie et al., ICLR 2023) on long-term forecasting.

  python -m experiments.run --workdir=/tmp/patchtst_etth1_96 \
      --config=experiments/configs/patchtst.py:data=etth1,pred_len=96

  # the paper's own setting (L=336, the small model, 100 epochs):
  python -m experiments.run --workdir=/tmp/patchtst_etth1_336_96 \
      --config=experiments/configs/patchtst.py:data=etth1,pred_len=96,native

Arguments: data (etth1, etth2, exchange, illness, ...), pred_len (96, 192, 336, 720; ILI 24, 36,
48, 60), seq_len (0 means the setting's default: 96, or 336 with native; ILI 36), seed (2021),
native (the paper's L=336 settings below), runlocal (two steps at tiny sizes, for smoke tests).

Default (the protocol's L=96 comparison, TSLib `scripts/long_term_forecast/ETT_script/
PatchTST_ETTh1.sh`): 1 encoder layer, n_heads 2/8/8/16 for H 96/192/336/720, d_model 512,
d_ff 2048, patch 16, stride 8, dropout 0.1 (TSLib's flatten head reuses it as head dropout), GELU,
no RevIN affine (the model keeps the paper's learnable positional embedding and biased patch
embedding, where TSLib uses a fixed sinusoidal one and no bias), and TSLib's protocol: Adam 1e-4,
batch 32, 10 epochs halving the learning rate each epoch, patience 3. Other data sets follow
TSLib's scripts for PatchTST at L=96 where they differ from ETTh1's (the model keeps d_model 512,
d_ff 2048, dropout 0.1 unless listed):

- ETTh2 (`ETT_script/PatchTST_ETTh2.sh`): 3 encoder layers, 4 heads.
- Exchange (`Exchange_script/PatchTST.sh`): 2 encoder layers, 8 heads (run.py's default); one
  training epoch at horizon 336 (`--train_epochs 1`).
- ILI (`ILI_script/PatchTST.sh`): lookback 36, label length 18, 4 encoder layers, heads 4/4/4/16
  and d_model 1024/2048/2048/2048 for H 24/36/48/60. The model patches the 36 steps with
  patch 16, stride 8 (3 patches, 4 with the end padding).

`native` (the authors' `PatchTST_supervised/scripts/PatchTST/etth1.sh`, PatchTST/42): seq_len 336,
e_layers 3, n_heads 4, d_model 16, d_ff 128, dropout 0.3, patch 16, stride 8, batch 128, lr 1e-4,
100 epochs, patience 100. The script passes `--fc_dropout 0.3 --head_dropout 0`; fc_dropout
only feeds the pretraining head, so the flatten head here runs with head_dropout 0.0, as in the
authors' script. The script's schedule (`lradj type3`, set after epoch e for epoch e + 1: lr
while e + 1 < 3, then lr * 0.9 ** (e + 1 - 3)) trains epochs 0 to 3 at lr and multiplies by 0.9
every epoch after: the trainer's step schedule with decay 0.9 every epoch from
decay_start_epoch 3. Sources of these settings: experiments/forecasting_protocol.md.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

# TSLib's PatchTST_ETTh1.sh heads per horizon at L=96.
_TSLIB_HEADS = {96: 2, 192: 8, 336: 8, 720: 16}


def _tslib_dataset_settings(data: str, pred_len: int) -> tuple[dict, dict]:
  """(model, train) overrides of TSLib's PatchTST scripts for data sets other than ETTh1."""
  if data == "etth2":
    return {"num_layers": 3, "num_heads": 4}, {}
  if data == "exchange":
    return {"num_layers": 2, "num_heads": 8}, ({"num_epochs": 1} if pred_len == 336 else {})
  if data == "illness":
    return {"num_layers": 4, "num_heads": 16 if pred_len == 60 else 4,
            "d_model": 1024 if pred_len == 24 else 2048, "d_ff": 2048}, {}
  return {}, {}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="etth1", seq_len=0, pred_len=96, seed=2021, native=False,
                  runlocal=False)
  seq_len = arg.seq_len or (336 if arg.native else 96)
  config = common.forecasting_protocol(base_config())
  config.seed = arg.seed
  config.data = common.forecasting_data(arg.data, seq_len=seq_len, pred_len=arg.pred_len)
  config.model = ConfigDict({
      "name": "patchtst",
      "patch_len": 16,
      "stride": 8,
      "d_model": 512,            # patch token width
      "d_ff": 2048,              # feed-forward hidden width
      "num_heads": _TSLIB_HEADS.get(arg.pred_len, 8),
      "num_layers": 1,           # encoder layers (e_layers)
      "dropout": 0.1,
      "head_dropout": 0.1,       # TSLib's FlattenHead uses the model dropout
      "activation": "gelu",
      "init": "torch",           # PyTorch's default Linear init, as in the reference code
      "attention_impl": "xla",   # see paperzoo.layers.attention
      "revin_affine": False,
  })
  config.optimizer.learning_rate = 1e-4
  if not arg.native:
    model_settings, train_settings = _tslib_dataset_settings(arg.data, arg.pred_len)
    config.model.update(model_settings)
    config.train.update(train_settings)
  if arg.native:
    config.model.update(d_model=16, d_ff=128, num_heads=4, num_layers=3, dropout=0.3,
                        head_dropout=0.0)
    config.train.batch_size = 128
    config.train.num_epochs = 100
    config.train.patience = 100
    config.optimizer.decay_rate = 0.9
    config.optimizer.decay_start_epoch = 3
  if arg.runlocal:
    common.runlocal(config)
    config.model.update(d_model=16, d_ff=16, num_heads=2, num_layers=1)
  return config
