"""Name -> code registries for models, tasks and data sets.

A config names its parts by string (`config.model.name = "itransformer"`); the registry maps the
string to the code. Looking up a name that is not registered fails before any compute, with the
list of valid names, so a typo in a config never starts a run.

    from paperzoo.registry import MODELS

    @MODELS.register("dlinear")
    class DLinear(nnx.Module): ...

    MODELS.get("dlinear")  # -> DLinear

Data sets also record what kind of data they hold (`DATA_KINDS`), and each task says which
kinds it takes (`Task.data_kinds`): `DATASETS.get(name, kinds=...)` refuses a data set of
another kind, naming the ones that fit. A new data set is one `@DATASETS.register(name,
kind=...)`; no task or grid keeps a list of names.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

# What a data set holds, by kind.
DATA_KINDS = {
    "forecasting": "a multivariate time series with timestamps, cut into forecast windows",
    "tokens": "labelled integer token sequences (Long Range Arena)",
    "image": "labelled uint8 images [N, H, W, C]",
    "series": "labelled multivariate time series of varying length (UEA)",
    "text": "a stream of characters or tokens, for language modelling",
}


class UnknownNameError(KeyError, ValueError):
  """A config named something that no registry entry provides."""

  def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
    return str(self.args[0])


class Registry:
  """A named collection of constructors (classes or functions).

  `modules` lists the modules that register entries when imported; they are imported on the
  first lookup, so `import paperzoo` stays cheap and adding a paper never edits this file.
  """

  def __init__(self, noun: str, modules: tuple[str, ...] = ()):
    self.noun = noun
    self._modules = modules
    self._entries: dict[str, Any] = {}
    self._imported = False

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries and self._entries[name] is not obj:
        raise ValueError(f"{self.noun} {name!r} is registered twice: "
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
          f"unknown {self.noun} {name!r}; valid {self.noun} names: "
          f"{', '.join(self.names())}") from None

  def __contains__(self, name: str) -> bool:
    self._import_modules()
    return name in self._entries


class DataSetRegistry(Registry):
  """Data set loaders, each with the kind of data it holds (a key of DATA_KINDS)."""

  def __init__(self, modules: tuple[str, ...] = ()):
    super().__init__("data set", modules)
    self._kinds: dict[str, str] = {}

  # pylint: disable-next=arguments-differ  (data sets must say their kind)
  def register(self, name: str, *, kind: str) -> Callable[[T], T]:
    if kind not in DATA_KINDS:
      raise ValueError(f"data set {name!r}: unknown kind {kind!r}; valid kinds: "
                       f"{', '.join(DATA_KINDS)}")
    self._kinds[name] = kind
    return super().register(name)

  def kind(self, name: str) -> str:
    self.get(name)  # UnknownNameError listing the valid names
    return self._kinds[name]

  def names(self, kinds: Iterable[str] | None = None) -> list[str]:
    """Every registered name, or those of the given kinds."""
    names = super().names()
    return names if kinds is None else [n for n in names if self._kinds[n] in set(kinds)]

  def get(self, name: str, kinds: Iterable[str] | None = None) -> Any:
    """The loader of `name`; with `kinds`, a data set of another kind is a ValueError that
    names the data sets of those kinds."""
    loader = super().get(name)
    if kinds is not None and self._kinds[name] not in set(kinds):
      kinds = tuple(kinds)
      wanted = " or ".join(filter(None, [", ".join(kinds[:-1]), kinds[-1]]))
      those = "that kind" if len(kinds) == 1 else "those kinds"
      raise ValueError(
          f"data set {name!r} holds {self._kinds[name]} data ({DATA_KINDS[self._kinds[name]]}),"
          f" but this needs {wanted} data; data sets of {those}: "
          f"{', '.join(self.names(kinds)) or 'none registered'}")
    return loader


# Each family's package imports its members in its __init__, so one module path per registry.
MODELS = Registry("model", ("paperzoo.models",))
TASKS = Registry("task", ("paperzoo.tasks",))
DATASETS = DataSetRegistry(("paperzoo.data",))
