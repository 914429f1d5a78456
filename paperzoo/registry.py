"""Name -> code registries for models, tasks and data sets.

A config names its parts by string (`config.model.name = "itransformer"`); the registry maps the
string to the code. Looking up a name that is not registered fails before any compute, with the
list of valid names, so a typo in a config never starts a run.

    from paperzoo.registry import MODELS

    @MODELS.register("dlinear")
    class DLinear(nnx.Module): ...

    MODELS.get("dlinear")  # -> DLinear
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
  """A config named something that no registry entry provides."""

  def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
    return str(self.args[0])


class Registry:
  """A named collection of constructors (classes or functions).

  `modules` lists the modules that register entries when imported; they are imported on the
  first lookup, so `import paperzoo` stays cheap and adding a paper never edits this file.
  """

  def __init__(self, kind: str, modules: tuple[str, ...] = ()):
    self.kind = kind
    self._modules = modules
    self._entries: dict[str, Any] = {}
    self._imported = False

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries and self._entries[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is registered twice: "
                         f"{self._entries[name]!r} and {obj!r}")
      self._entries[name] = obj
      return obj
    return decorator

  def _import_modules(self) -> None:
    if not self._imported:
      self._imported = True
      for module in self._modules:
        importlib.import_module(module)

  def names(self) -> list[str]:
    self._import_modules()
    return sorted(self._entries)

  def get(self, name: str) -> Any:
    self._import_modules()
    try:
      return self._entries[name]
    except KeyError:
      raise UnknownNameError(
          f"unknown {self.kind} {name!r}; valid {self.kind} names: "
          f"{', '.join(self.names())}") from None

  def __contains__(self, name: str) -> bool:
    self._import_modules()
    return name in self._entries


# Each family's package imports its members in its __init__, so one module path per registry.
MODELS = Registry("model", ("paperzoo.models",))
TASKS = Registry("task", ("paperzoo.tasks",))
DATASETS = Registry("data set", ("paperzoo.data",))
