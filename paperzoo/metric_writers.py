"""Where metrics go: JSON lines, TensorBoard event files, and a progress bar.

`<workdir>/metrics.jsonl` holds one record per line: `{"step": 100, "split": "train",
"loss": 0.41, ...}`. On resume the records after the restored step, and the final test's, are
dropped first, so the file always reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import tqdm
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes metric records to `metrics.jsonl` and TensorBoard under `<workdir>/tensorboard`.

  With `enabled=False` (every process of a multi-process run but the first) it writes nothing
  and only keeps `last_train_loss`.
  """

  def __init__(self, workdir: str | pathlib.Path, *, resume_step: int | None = None,
               enabled: bool = True):
    self.enabled = enabled
    self.last_train_loss = float("nan")
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    if resume_step is not None and self.path.exists():
      # The final test's record (at the best step) is written again when the run ends.
      records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      kept = [r for r in records if r["step"] <= resume_step and r["split"] != "test"]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif resume_step is None and self.path.exists():
      self.path.unlink()
    self._file = open(self.path, "a")
    self._tensorboard = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30)

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if split == "train" and "loss" in metrics:
      self.last_train_loss = float(metrics["loss"])
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_json_number(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    self._tensorboard.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """All records of a run's `metrics.jsonl`, in order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _to_json_number(value: Any) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def progress_bar(*, total: int, initial: int, enabled: bool) -> tqdm.tqdm:
  """A bar with steps/s and ETA; tqdm redraws at most once a second to stay cheap."""
  return tqdm.tqdm(total=total, initial=initial, unit="step", disable=not enabled,
                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr, smoothing=0.1)
