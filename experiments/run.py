r"""Trains and evaluates one config: the command-line entry point, kept thin on purpose.

  python -m experiments.run --config=experiments/configs/itransformer.py:data=etth1 \
      --workdir=/tmp/itransformer_etth1 [--config.model.d_model=128 ...]

It trains the runs the config reads first, when they have not finished (VAR's tokenizer, the
reference classifier that scores generated samples: `experiments.prerequisites`), then
`paperzoo.train_and_evaluate(config, workdir)`. A notebook makes the same call,
`prerequisites.train(config, workdir)`, with a ConfigDict. The config is locked: overriding a
key that does not exist fails.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import prerequisites

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally followed by :args (see its docstring).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots and "
                               "results.json go. An existing workdir is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host on "
    "a TPU pod or a multi-node GPU cluster (see launch/).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax and XLA log every save and restore at INFO; the trainer prints its own summary lines.
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  results = prerequisites.train(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
