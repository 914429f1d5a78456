r"""Samples text from a trained character language model (a finished `language_model` run).

  python -m experiments.sample --workdir=/tmp/char_lm --prompt="ROMEO:" \
      --max_new_tokens=500 --temperature=0.8 --top_k=40 --num_samples=2 --seed=0

The best checkpoint is restored (`paperzoo.workdir.load_best_model`), the prompt encoded with the
run's vocabulary, and `paperzoo.generation.decoding.generate` decodes with the model's cache: the
prompt in one parallel pass, then one jitted step per character. Prints the samples, then the
decoding speed. A character outside the vocabulary, a prompt longer than the model's context or
a model without a cache path is one line on stderr (exit code 2, `experiments.cli`).
"""

from __future__ import annotations

from absl import flags
from absl import logging

from experiments import cli
from paperzoo import config as config_lib
from paperzoo import workdir as workdir_lib
from paperzoo.generation import decoding

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished language_model run.")
_PROMPT = flags.DEFINE_string("prompt", "\n", "The text the samples continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 500, "Characters to generate.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples of the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0: argmax).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k likeliest characters (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 0.0, "Nucleus sampling mass (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Fixes the samples.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise config_lib.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if _NUM_SAMPLES.value < 1:
    raise config_lib.ConfigError(f"--num_samples={_NUM_SAMPLES.value} must be >= 1")
  workdir = _WORKDIR.value
  if not workdir_lib.is_done(workdir):
    raise workdir_lib.MissingRunError(f"{workdir} holds no finished run to sample from")
  model, task = workdir_lib.load_best_model(workdir)
  data = task.data
  if getattr(data, "encode", None) is None:
    name = workdir_lib.read_config(workdir).data.name
    raise config_lib.ConfigError(f"{workdir} was trained on {name!r}, which has no characters "
                                 "to sample (a synthetic probe)")
  try:
    prompt = data.encode(_PROMPT.value)
    tokens, stats = decoding.generate(
        model, [prompt] * _NUM_SAMPLES.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        seed=_SEED.value, return_stats=True)
  except ValueError as error:  # the prompt or the sampling settings: the user's to fix
    raise config_lib.ConfigError(cli.one_line(error)) from error
  for i, row in enumerate(tokens):
    print(f"--- sample {i} ---\n{data.decode(row)}")
  print(f"--- {stats.decode_tokens_per_second * len(tokens):.0f} characters/s decoding "
        f"({len(tokens)} x {stats.new_tokens} in {stats.decode_seconds:.2f} s), prefill "
        f"{stats.prefill_seconds * 1e3:.1f} ms")


if __name__ == "__main__":
  cli.run(main)
