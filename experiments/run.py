r"""Trains and evaluates one config: the command-line entry point, kept thin on purpose.

  python -m experiments.run --config=experiments/configs/itransformer.py:data=etth1 \
      --workdir=/tmp/itransformer_etth1 [--config.model.d_model=128 ...]

It trains the runs the config reads first, when they have not finished (VAR's tokenizer, the
reference classifier that scores generated samples: `experiments.prerequisites`), then
`paperzoo.train_and_evaluate(config, workdir)`. A notebook makes the same calls
(`prerequisites.train(config, workdir)`) with a ConfigDict. The config is locked: overriding a
key that does not exist fails, naming the keys that do.

Exit codes (`experiments.cli`): 0 done, 2 a wrong config or flag, 3 missing data or a missing
run it reads, 4 the workdir is in use, 5 disk full, 6 the workdir holds a run of another
config, 7 a non-finite loss, 75 preempted (run the same command to resume), 1 a bug. A user's
error is one line on stderr; --verbose shows its traceback.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

import paperzoo
from experiments import cli
from experiments import prerequisites
from paperzoo import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally followed by :args (see its docstring).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots and "
                               "results.json go. An existing workdir is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host on "
    "a TPU pod or a multi-node GPU cluster (see launch/).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a run with other optimizer or training settings "
    "than it was trained with; the workdir's config_history.jsonl keeps every config with the "
    "step it started at.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise config_lib.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Orbax and XLA log every save and restore at INFO; the trainer prints its own summary lines.
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  prerequisites.train_prerequisites(_CONFIG.value)
  results = paperzoo.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                        allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  print(json.dumps(results, indent=2))
  if results.get("status") == "preempted":
    sys.exit(cli.PREEMPTED)


if __name__ == "__main__":
  cli.run(main)
