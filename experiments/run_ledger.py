"""The ledger of finished runs, kept in the repository beside each reproduction report.

A run's workdir (checkpoints, TensorBoard files, pictures) lives outside the repository, usually
under /tmp, and can vanish (a cleared /tmp, a new machine); the results in a report must not
vanish with it.
So each report keeps a ledger beside it, `<report stem>_runs.jsonl` (for example
`experiments/results/classification_runs.jsonl`): one JSON line per finished run, sorted by the
run's key (its workdir below the grid's root, e.g. `protocol/mnist/swin/seed2021`), holding

- `results`: the run's `results.json` as the trainer wrote it;
- `config_digest`: a digest of the config it was trained with (keys that change nothing are
  left out, see `paperzoo.config.NON_COMPUTING_KEYS`), so a run whose config changed since
  still reads as stale; a change to a model's code that changes its numbers raises the
  config's `model.revision` (0 where absent), which makes the runs recorded before it stale
  the same way;
- `finished` (unix time of `results.json`), `commit` (paperzoo's commit when it was recorded)
  and `command` (the `experiments.run` command that trains it alone);
- `recovered` (only some records): where the record was rebuilt from when its workdir was lost
  before the ledger existed; such a record holds only the scores that source had.

The grids read a run's workdir first and its ledger record second (`grids.run_state`),
and add every finished workdir to the ledger when they write their report (`Ledger.sync`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
from typing import Any, Iterable

from paperzoo import config as config_lib
from paperzoo import workdir as workdir_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

def _compared(config: dict[str, Any]) -> dict[str, Any]:
  """The flattened config without the keys that change nothing (ignored, saying how to train a
  run it reads, or added since at the default that does what older runs did:
  `paperzoo.config.comparable`)."""
  flat = config_lib.comparable(config_lib.flatten(config))
  return {k: v for k, v in flat.items() if not config_lib.changes_nothing(k)}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Keys whose values differ between two config dicts, ignoring the ones that change nothing."""
  a, b = _compared(saved), _compared(current)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def config_digest(config: dict[str, Any]) -> str:
  """Equal for two configs exactly when `config_differences` finds none."""
  text = json.dumps(_compared(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_dict(config) -> dict[str, Any]:
  """An ml_collections config as the trainer saves it in `config.json`."""
  return json.loads(config.to_json_best_effort())


def ledger_path(report: str | os.PathLike) -> pathlib.Path:
  """`experiments/results/classification.md` -> `experiments/results/classification_runs.jsonl`."""
  report = pathlib.Path(report)
  return report.with_name(f"{report.stem}_runs.jsonl")


def report_lock(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
  """Held while one process rewrites a report and its ledger (`.<report name>.lock` beside
  it, the lock every run's workdir has: `paperzoo.workdir.lock`, waited for). Processes that
  train different runs of one table at once each take it, then read the ledger, so neither
  drops the other's records."""
  return workdir_lib.lock(path, wait=True)


def current_commit() -> str:
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


@dataclasses.dataclass(frozen=True)
class Record:
  """One finished run (see the module docstring for the fields)."""

  key: str
  results: dict[str, Any]
  config_digest: str
  finished: float | None
  commit: str
  command: str
  recovered: str = ""

  def to_json(self) -> str:
    fields = dataclasses.asdict(self)
    if not self.recovered:
      del fields["recovered"]
    return json.dumps(fields, sort_keys=True)


class Ledger:
  """The records of one report, read from and written to `path` (a missing file is empty)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self._records: dict[str, Record] = {}
    if self.path.exists():
      for number, line in enumerate(self.path.read_text().splitlines(), 1):
        if not line.strip():
          continue
        try:
          record = Record(**json.loads(line))
        except (ValueError, TypeError) as error:
          raise ValueError(f"{self.path}:{number} is not a run record ({error}); fix or remove "
                           "that line (git has the file's history)") from error
        self._records[record.key] = record

  def __len__(self) -> int:
    return len(self._records)

  def get(self, key: str) -> Record | None:
    return self._records.get(key)

  def put(self, records: Iterable[Record]) -> None:
    """Adds or replaces records and rewrites the file (atomically, sorted by key)."""
    self._records.update((r.key, r) for r in records)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    partial = self.path.with_name(self.path.name + ".partial")
    partial.write_text("".join(self._records[k].to_json() + "\n" for k in sorted(self._records)))
    partial.replace(self.path)

  def sync(self, runs: Iterable[Any]) -> int:
    """Records every run (anything with `key`, `workdir`, `command` and `config()`) whose
    workdir holds a `results.json` that the ledger does not have yet; returns how many."""
    new = []
    commit = None
    for run in runs:
      results_path = run.workdir / "results.json"
      if not results_path.exists():
        continue
      results = json.loads(results_path.read_text())
      finished = results_path.stat().st_mtime
      known = self.get(run.key)
      if known is not None and known.results == results and known.finished == finished:
        continue
      saved_path = run.workdir / "config.json"
      saved = (json.loads(saved_path.read_text()) if saved_path.exists()
               else config_dict(run.config()))
      commit = commit or current_commit()
      new.append(Record(run.key, results, config_digest(saved), finished, commit, run.command))
    if new:
      self.put(new)
    return len(new)
