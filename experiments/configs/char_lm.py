r"""Character-level language models on tiny-shakespeare, and the recall probes (MQAR, passkey),
with the causal token mixer as an argument.

  python -m experiments.run --workdir=/tmp/char_lm \
      --config=experiments/configs/char_lm.py
  python -m experiments.run --workdir=/tmp/char_lm_gla \
      --config=experiments/configs/char_lm.py:mixer=gla,seed=2022
  python -m experiments.run --workdir=/tmp/mqar_mamba \
      --config=experiments/configs/char_lm.py:data=mqar,mixer=mamba,seq_len=128
  python -m experiments.sample --workdir=/tmp/char_lm --prompt="ROMEO:" --temperature=0.8

Arguments: mixer (attention | linear | gla | lightning | mamba), size, data (tinyshakespeare |
mqar | passkey), seq_len (0: the size's context), num_kv_pairs (MQAR; 0: seq_len / 16), steps
(0: the size's), matmul (float32 | bfloat16: the dense layers' products with bfloat16 operands
and float32 accumulation, paperzoo.layers.matmul), seed, runlocal (two steps).

Sizes:
  cpu   nanoGPT's shakespeare_char for CPUs (its README): 4 layers, 4 heads, width 128,
        context 64, batch 12, 2,000 iterations, no dropout, AdamW lr 1e-3 with 100 warm-up
        steps and cosine decay to 1e-4, beta2 0.99, weight decay 0.1 on matrices and
        embeddings (nanoGPT decays every parameter of two or more dimensions), gradient
        clipping 1.0, learned positions, tied embeddings, no biases. nanoGPT reaches about
        1.88 validation loss (nats per character).
  gpu   nanoGPT's shakespeare_char config: 6 layers, 6 heads, width 384, context 256, batch 64,
        dropout 0.2, 5,000 iterations (1.47 on one A100); ready for a GPU.
  long  the long-context model: the cpu model at a context of 2,048 characters with rotary
        positions, a quarter of its training windows carrying a passkey (see
        paperzoo.data.text), batch 4, 600 steps (4.9M characters, about what the cpu size
        sees; a step costs about a second on 2 CPU cores), evaluated every 200; the
        block-sparse prefill methods are measured on it.
The recall probes train 2-layer, 64-wide models (as Zoology's smallest) on generated data, batch
64, 5,000 steps at lr 3e-3, selected on validation accuracy; MQAR with seq_len / 16 key-value pairs from a
vocabulary of 512 (Zoology: 8,192).

Mixers other than attention use no position embedding (their state carries order), as their
papers do; attention uses nanoGPT's learned positions (rotary at size long).
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

MIXERS = ("attention", "linear", "gla", "lightning", "mamba")
SIZES = ("cpu", "gpu", "long")
DATA = ("tinyshakespeare", "mqar", "passkey")

# d_model, num_layers, num_heads, seq_len, batch, steps, dropout
_SIZES = {
    "cpu": dict(d_model=128, num_layers=4, num_heads=4, seq_len=64, batch=12, steps=2000,
                dropout=0.0),
    "gpu": dict(d_model=384, num_layers=6, num_heads=6, seq_len=256, batch=64, steps=5000,
                dropout=0.2),
    "long": dict(d_model=128, num_layers=4, num_heads=4, seq_len=2048, batch=4, steps=600,
                 dropout=0.0),
}
# The recall probes: small models on generated data (Zoology trains 2-layer models). Attention
# on MQAR sits on a plateau (one of the sequence's values, not the right one) for its first
# ~3,000 steps at lr 3e-3 before the recall circuit forms.
_PROBE = dict(d_model=64, num_layers=2, num_heads=4, batch=64, steps=5000, dropout=0.0)
_PROBE_LEARNING_RATE = 3e-3
_PROBE_SEQ_LEN = {"mqar": 64, "passkey": 256}
LONG_PASSKEY_FRACTION = 0.25
# Zoology's MQAR draws from 8,192 tokens; on the CPU the output layer over them would cost more
# than the rest of these small models, so keys and values come from 512 (256 each).
MQAR_VOCAB = 512


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, mixer="attention", size="cpu", data="tinyshakespeare", seq_len=0,
                  num_kv_pairs=0, steps=0, matmul="float32", seed=2021,
                  runlocal=False)
  for key, value, valid in (("mixer", arg.mixer, MIXERS), ("size", arg.size, SIZES),
                            ("data", arg.data, DATA)):
    if value not in valid:
      raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")
  probe = arg.data != "tinyshakespeare"
  size = dict(_SIZES[arg.size])
  if probe:
    size.update(_PROBE, seq_len=_PROBE_SEQ_LEN[arg.data])
  seq_len = arg.seq_len or size["seq_len"]

  config = base_config()
  config.seed = arg.seed
  config.data = ConfigDict({"name": arg.data, "seq_len": seq_len})
  if arg.data == "mqar":
    config.data.num_kv_pairs = arg.num_kv_pairs or max(seq_len // 16, 1)
    config.data.vocab_size = MQAR_VOCAB
  if arg.size == "long" and not probe:
    config.data.passkey_fraction = LONG_PASSKEY_FRACTION
  config.task = ConfigDict({"name": "language_model", "num_samples": 0 if probe else 2,
                            "sample_length": 500, "temperature": 0.8, "top_k": 0,
                            "top_p": 0.0, "sample_seed": 0})
  positions = "none"
  if arg.mixer == "attention":
    positions = "rotary" if arg.size == "long" else "learned"
  config.model = ConfigDict({
      "name": "decoder_lm", "mixer": arg.mixer, "d_model": size["d_model"],
      "num_layers": size["num_layers"], "num_heads": size["num_heads"], "mlp_ratio": 4.0,
      "positions": positions, "tie_embeddings": True, "bias": False,
      "dropout": size["dropout"], "attention_dropout": size["dropout"],
      # The long model's attention skips the masked half (paperzoo.layers.attention, "blocked").
      "attention_impl": "blocked" if arg.size == "long" else "xla", "matmul_dtype": arg.matmul,
      # The mixers' own keys (paperzoo.layers.causal_mixers), at their papers' values.
      "gla_key_ratio": 0.5, "gla_gate_rank": 16, "gla_gate_temperature": 16.0,
      "rope_base": 10000.0, "linear_attention_impl": "auto", "chunk_size": 64,
      "lightning_decay": "alibi", "init": "torch",
      "d_state": 16, "d_conv": 4, "expand": 2, "scan_impl": "auto",
  })
  config.train.batch_size = size["batch"]
  config.train.eval_batch_size = 64 if arg.size == "long" else 256
  config.train.num_steps = arg.steps or size["steps"]
  config.train.eval_every_steps = 200 if arg.size == "long" else 250
  config.train.log_every_steps = 50
  config.train.patience = 0
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = _PROBE_LEARNING_RATE if probe else 1e-3
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.1
  config.optimizer.decay_vectors = False
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.min_lr_ratio = 0.1
  config.optimizer.grad_clip_norm = 1.0
  if arg.mixer == "mamba":
    config.optimizer.no_decay_pattern = common.MAMBA_NO_DECAY_PATTERN
  if arg.runlocal:
    common.runlocal(config)
    config.model.update(d_model=32, num_layers=2, num_heads=2, d_state=4)
    # (the long model's windows must fit a passkey: 105 characters)
    config.data.seq_len = 128 if arg.size == "long" else min(seq_len, 32)
    if arg.data == "mqar":
      config.data.update(num_kv_pairs=2, vocab_size=64, num_train=64, num_val=16,
                         num_test=16)
    if arg.data == "passkey":
      config.data.update(seq_len=160, num_train=64, num_val=16, num_test=16)
    config.task.sample_length = 20
  return config
