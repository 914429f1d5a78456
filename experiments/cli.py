"""What the command lines share: one clear line for a user's error, and exit codes that say what
happened (`python -m experiments.run`, `python -m experiments.reproduce`).

  code  meaning                                            what to do
  0     done (or already done)
  1     an unexpected error (a bug): the traceback is printed
  2     the config or the command line is wrong            fix the flag or key it names
  3     a data file or a run this one reads is missing      the line says where / which command
  4     another process holds the workdir                  wait, or use another --workdir
  5     no space left on device                            free space, run the same command
  6     the workdir holds a run of another config          same config, another workdir, or
                                                           --allow_config_change
  7     the training loss became NaN or infinite           lower the learning rate, ...
  75    preempted (SIGTERM): saved, not finished           run the same command to resume

A user's error prints `error: <one line>` on stderr and no traceback; `--verbose` (or
PAPERZOO_VERBOSE=1) shows it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags

from experiments import configs
from experiments import prerequisites
from paperzoo import checkpoint as checkpoint_lib
from paperzoo import config as config_lib
from paperzoo import trainer
from paperzoo import workdir as workdir_lib
from paperzoo.data import files
from paperzoo.registry import UnknownNameError

DONE, ERROR, CONFIG, MISSING, BUSY, DISK_FULL, OTHER_RUN, NOT_FINITE = 0, 1, 2, 3, 4, 5, 6, 7
PREEMPTED = 75  # EX_TEMPFAIL: try again later

# Most specific first: MissingRunError and DataFileError are FileNotFoundErrors, ChangedConfigError
# a CheckpointMismatchError, ConfigError and UnknownNameError ValueErrors.
_USER_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (config_lib.ConfigError, CONFIG),
    (UnknownNameError, CONFIG),
    (app.UsageError, CONFIG),
    (workdir_lib.MissingRunError, MISSING),
    (files.DataFileError, MISSING),
    (prerequisites.PrerequisiteError, MISSING),
    (workdir_lib.WorkdirBusyError, BUSY),
    (trainer.DiskFullError, DISK_FULL),
    (checkpoint_lib.CheckpointMismatchError, OTHER_RUN),
    (checkpoint_lib.CheckpointCorruptError, OTHER_RUN),
    (trainer.NonFiniteLossError, NOT_FINITE),
)

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a user's error too "
                             "(also: PAPERZOO_VERBOSE=1).")


def exit_code(error: BaseException) -> int | None:
  """The exit code of a user's error, or None for anything else (a bug)."""
  for kind, code in _USER_ERRORS:
    if isinstance(error, kind):
      return code
  return None


def one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _verbose() -> bool:
  flag = _VERBOSE.value if flags.FLAGS.is_parsed() else "--verbose" in sys.argv
  return bool(flag) or os.environ.get("PAPERZOO_VERBOSE", "") not in ("", "0")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad `--config.<key>=...` override reported in one line: a key
  the config lacks names the keys of its section and the closest one."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of a missing key
    raise config_lib.ConfigError(_missing_override(argv) or one_line(error)) from error
  except flags.Error as error:
    raise config_lib.ConfigError(one_line(error)) from error


def _missing_override(argv: list[str]) -> str | None:
  """`unknown key model.x; keys of config.model: ...` for the first `--config.<key>` override
  whose key the config (`--config=<file>:<arg>`) does not have."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  try:
    config = configs.load(spec.split("experiments/configs/")[-1])
  except Exception:  # pylint: disable=broad-except  (then the plain error says enough)
    return None
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if not config_lib.lookup(config, key)[0]:
        return config_lib.unknown_key_message(config, key)
  return None


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)`, with a user's error as one line and its exit code (module docstring)."""
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit:
    raise
  except BaseException as error:  # pylint: disable=broad-except
    code = exit_code(error)
    if code is None or _verbose():
      raise
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(code)
