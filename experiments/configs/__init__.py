"""One file per paper: `get_config(arg)` with the paper's hyper-parameters and its run command.

`load(name, arg)` builds the config `python -m experiments.run
--config=experiments/configs/<name>.py:<arg>` trains; `names()` lists the configs (not
`common.py`, the sections they share).
"""

from __future__ import annotations

import importlib
import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
  """The configs in this folder: its .py files but common.py and private ones (_*.py)."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                if p.stem != "common" and not p.stem.startswith("_"))


def load(name: str, arg: str | None = None):
  """`experiments/configs/<name>.py`'s get_config(arg). `name` may end in ".py", and may carry
  the argument itself: load("var_tokenizer.py:data=mnist")."""
  name, _, spec_arg = name.partition(":")
  name = name.removesuffix(".py")
  if arg is None and spec_arg:
    arg = spec_arg
  if name not in names():
    raise FileNotFoundError(f"no config experiments/configs/{name}.py; configs: "
                            f"{', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}").get_config(arg)
