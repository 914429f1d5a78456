r"""The language-model reproduction: five causal mixers on character-level tiny-shakespeare,
the recall probes (MQAR, passkey), and the long-context model, with seeds.

`python -m experiments.reproduce lm` (thin CLI in experiments/reproduce.py) calls `GRID.train`,
which trains every unfinished run of the chosen entries (one workdir per entry and seed under
--workdir; a finished run is skipped, a half-finished one resumes) and writes
`experiments/results/language_model.md` and `.csv` after each run:

  * shakespeare/<mixer>: nanoGPT's CPU configuration with each mixer
    (`experiments/configs/char_lm.py`): validation loss (nats per character) and bits per
    character over the whole validation split (the split nanoGPT both selects and reports on;
    so do we), training characters per second, decoding characters per second (cached decoding
    of the samples), parameters; the anchor: attention at most 1.90 (nanoGPT: about 1.88);
  * mqar/<mixer>/L<length>: multi-query associative recall at sequence lengths 64, 128 and 256
    with length / 16 key-value pairs: test accuracy on the queried values, plotted against the
    length, one line per mixer (`language_model/mqar.png`);
  * passkey/<mixer>/L<length>: passkey retrieval trained and tested at lengths 128 and 256:
    test accuracy of the whole five-character key, plotted against the length
    (`language_model/passkey.png`);
  * long/attention: the 2,048-character model with passkeys mixed into training: validation
    bits per character and passkey accuracy by depth (its own run's picture);
  * gpu/attention: nanoGPT's GPU configuration, run only when named.
Each finished shakespeare run's samples (`samples.txt`) are quoted in a samples section.

The training loop, run states (done / stale / failed / started) and the workdir check are
those every grid shares (`experiments.grids`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

from experiments import grids
from experiments import run_ledger
from experiments.configs import char_lm

REPO_ROOT = grids.REPO_ROOT
DEFAULT_WORKDIR = pathlib.Path("/tmp/paperzoo_reproduce_lm")
DEFAULT_REPORT = REPO_ROOT / "experiments" / "results" / "language_model.md"
NANOGPT_VAL_LOSS = 1.88  # nanoGPT's shakespeare_char CPU run (its README)
TARGET_VAL_LOSS = 1.90
MQAR_LENGTHS = (64, 128, 256)
PASSKEY_LENGTHS = (128, 256)
SAMPLE_CHARACTERS = 300  # of each run's first sample, quoted in the report


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of a table: the char_lm config's arguments (the seed is added per run)."""

  key: str
  group: str  # shakespeare | mqar | passkey | long | gpu
  mixer: str
  arg: str
  length: int = 0  # the probes' sequence length
  config: str = "char_lm"  # the config file the arguments are for


ENTRIES: tuple[Entry, ...] = (
    *(Entry(f"shakespeare/{mixer}", "shakespeare", mixer, f"mixer={mixer}")
      for mixer in char_lm.MIXERS),
    *(Entry(f"mqar/{mixer}/L{length}", "mqar", mixer,
            f"data=mqar,mixer={mixer},seq_len={length}", length)
      for mixer in char_lm.MIXERS for length in MQAR_LENGTHS),
    *(Entry(f"passkey/{mixer}/L{length}", "passkey", mixer,
            f"data=passkey,mixer={mixer},seq_len={length}", length)
      for mixer in char_lm.MIXERS for length in PASSKEY_LENGTHS),
    Entry("long/attention", "long", "attention", "mixer=attention,size=long"),
    Entry("gpu/attention", "gpu", "attention", "mixer=attention,size=gpu"),
)
CPU_KEYS = tuple(e.key for e in ENTRIES if e.group != "gpu")
# What a finished run leaves for the report.
PICTURES = ("loss_by_position.png", "passkey_depth.png", "samples.txt")


def entries(keys: Iterable[str] | None = None) -> list[Entry]:
  return grids.select_entries(ENTRIES, keys, CPU_KEYS)


# A run of this grid: an entry at one seed (`grids.EntryRun`).
LanguageModelRun = grids.EntryRun
runs = grids.entry_runs


def run_metrics(results: dict[str, Any], config: Any) -> dict[str, float]:
  """The numbers a finished run contributes to the table (`config`: the run's, for the
  characters of a training step)."""
  test = results.get("test", {})
  values = {name: test[name] for name in ("loss", "bits_per_char", "accuracy",
                                          "sequence_accuracy") if name in test}
  values.update({name: value for name, value in test.items()
                 if name.startswith("accuracy_depth_")})
  # The trainer's "train" seconds leave out the first step (its compilation) and evaluations.
  seconds = results.get("seconds", {}).get("train")
  if seconds and results.get("steps", 0) > 1:
    tokens = (results["steps"] - 1) * config.train.batch_size * config.data.seq_len
    values["train_tokens_per_second"] = tokens / seconds
  final = results.get("final_metrics") or {}
  values.update({name: value for name, value in final.items()
                 if name == "decode_tokens_per_second" or name.startswith("passkey_accuracy")})
  if "num_params" in results:
    values["num_params"] = results["num_params"]
  return values


@dataclasses.dataclass
class Row:
  entry: Entry
  status: str
  commands: list[str]
  seeds: list[int]
  done: list[tuple[LanguageModelRun, grids.RunState]]

  metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per done run

  def values(self, name: str) -> list[float]:
    return [values[name] for values in self.metrics if name in values]

  def mean_std(self, name: str) -> tuple[float, float]:
    return grids.mean_std(self.values(name))


def collect(chosen: Sequence[Entry], *, seeds: int | Sequence[int],
            workdir: str | os.PathLike, fast: bool = False,
            ledger: run_ledger.Ledger | None = None) -> list[Row]:
  """Each entry's finished, up-to-date runs, from the workdirs, then `ledger`."""
  by_entry: dict[str, list[LanguageModelRun]] = {}
  for run in runs(chosen, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger):
    by_entry.setdefault(run.entry.key, []).append(run)
  rows = []
  for entry in chosen:
    entry_runs = by_entry[entry.key]
    states = [grids.run_state(run) for run in entry_runs]
    done = [(run, s) for run, s in zip(entry_runs, states) if s.status == "done"]
    rows.append(Row(entry, grids.status_line(states), [run.command for run in entry_runs],
                    [run.seed for run in entry_runs], done,
                    [run_metrics(state.results, run.config()) for run, state in done]))
  return rows


def _fmt(row: Row, name: str, *, scale: float = 1.0, digits: int = 3) -> str:
  values = row.values(name)
  if not values:
    return "-"
  mean, std = grids.mean_std([v * scale for v in values])
  spread = "" if math.isnan(std) else f" ± {std:.{digits}f}"
  return f"{mean:.{digits}f}{spread}"


def _count(row: Row, name: str) -> str:
  """A number every seed shares (a parameter count), as an integer."""
  values = sorted(set(row.values(name)))
  return "-" if not values else " / ".join(f"{int(v):,}" for v in values)


def _pictures(row: Row, folder: pathlib.Path, base: pathlib.Path) -> str:
  """Links to the first finished run's pictures, copied beside the report."""
  for run, _ in row.done:
    copies = grids.copy_pictures(run.workdir, PICTURES[:2], folder, entry_key=row.entry.key,
                                 seed=run.seed)
    if copies:
      return grids.picture_links(copies, base)
  return "-"


def _first_sample(row: Row) -> tuple[int, str] | None:
  for run, _ in row.done:
    path = run.workdir / "samples.txt"
    if path.exists():
      return run.seed, path.read_text()[:SAMPLE_CHARACTERS]
  return None


def _probe_plot(rows: Sequence[Row], group: str, metric: str, path: pathlib.Path,
                title: str) -> pathlib.Path | None:
  """Accuracy against the sequence length, one line per mixer, error bars over seeds."""
  lines = {}
  for row in rows:
    if row.entry.group == group and row.values(metric):
      mean, std = row.mean_std(metric)
      lines.setdefault(row.entry.mixer, []).append(
          (row.entry.length, mean, 0.0 if math.isnan(std) else std))
  if not lines:
    return None
  from paperzoo import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  return plots.lines_with_error_bars(
      {mixer: sorted(points) for mixer, points in lines.items()}, path,
      xlabel="sequence length", ylabel=metric.replace("_", " "), title=title, log_x=True)


def write_report(rows: Sequence[Row], path: str | os.PathLike, *, command: str,
                 fast: bool = False) -> dict[str, pathlib.Path]:
  """Markdown and CSV: the mixers' table, the probes' tables and plots, the long-context run,
  the samples."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  folder = grids.picture_dir(path)
  seeds = sorted({seed for row in rows for seed in row.seeds})
  finished = [s.finished for row in rows for _, s in row.done]
  lines = grids.report_header(
      "Language modelling: causal mixers on tiny-shakespeare, recall probes, long context",
      command=command, finished=finished, seeds=seeds, fast=fast)
  lines.append(
      "- Split: nanoGPT's (first 90% of the characters train, last 10% validation). The "
      "validation split both selects the checkpoint and is reported, as nanoGPT does; it is "
      "scored whole (non-overlapping windows, the last partial one masked), not on nanoGPT's "
      "random batches. Loss in nats per character; bits/char = loss / ln 2.")
  by_group: dict[str, list[Row]] = {}
  for row in rows:
    by_group.setdefault(row.entry.group, []).append(row)

  if "shakespeare" in by_group:
    lines += ["", "## Mixers on tiny-shakespeare (nanoGPT's CPU configuration)", "",
              f"Anchor: nanoGPT's attention model reaches about {NANOGPT_VAL_LOSS:.2f} "
              f"validation loss; the target for ours is at most {TARGET_VAL_LOSS:.2f}. "
              "Characters per second: training (the trainer's training time, compilation and "
              "evaluations excluded) and decoding (the cached steps of the two samples, "
              "decoded as one batch), measured while the grid's runs shared the 2 cores "
              "(`lm_speed.md` has the timings of a quiet machine).", ""]
    lines += grids.markdown_table(
        ["mixer", "val loss (nats/char)", "val bits/char", "train chars/s",
         "decode chars/s", "parameters", "n", "status", "command"],
        ([row.entry.mixer, _fmt(row, "loss"), _fmt(row, "bits_per_char"),
          _fmt(row, "train_tokens_per_second", digits=0),
          _fmt(row, "decode_tokens_per_second", digits=0),
          _count(row, "num_params"), len(row.done), row.status,
          f"`{row.commands[0]}`"] for row in by_group["shakespeare"]))
  for group, title, metric in (("mqar", "MQAR (multi-query associative recall)", "accuracy"),
                               ("passkey", "Passkey retrieval", "sequence_accuracy")):
    if group not in by_group:
      continue
    lines += ["", f"## {title}", "",
              f"Test {metric.replace('_', ' ')} (%), one model trained per mixer and length."]
    picture = _probe_plot(by_group[group], group, metric, folder / f"{group}.png", title)
    if picture is not None:
      lines += ["", f"![{group}]({os.path.relpath(picture, path.parent)})"]
    lines += [""] + grids.markdown_table(
        ["entry", f"test {metric} (%)", "n", "status", "command"],
        ([row.entry.key, _fmt(row, metric, scale=100, digits=1), len(row.done), row.status,
          f"`{row.commands[0]}`"] for row in by_group[group]))
  for group, title in (("long", "Long context (2,048 characters, passkeys in training)"),
                       ("gpu", "GPU configuration")):
    if group not in by_group:
      continue
    lines += ["", f"## {title}", ""]
    if group == "long":
      lines += ["Passkey accuracy: the whole 5-letter key right, on 250 passkey examples built "
                "in the validation text after training, by the depth of the key line (five "
                "bins, shallowest first).", ""]
    lines += grids.markdown_table(
        ["entry", "val loss", "val bits/char", "passkey accuracy (%)", "by depth (%)", "n",
         "status", "pictures", "command"],
        ([row.entry.key, _fmt(row, "loss"), _fmt(row, "bits_per_char"),
          _fmt(row, "passkey_accuracy", scale=100, digits=1),
          " / ".join(_fmt(row, f"passkey_accuracy_depth_{b}", scale=100, digits=0)
                     for b in range(5)),
          len(row.done), row.status, _pictures(row, folder, path.parent),
          f"`{row.commands[0]}`"] for row in by_group[group]))
  samples = [(row, _first_sample(row)) for row in by_group.get("shakespeare", [])]
  samples = [(row, sample) for row, sample in samples if sample is not None]
  if samples:
    lines += ["", "## Samples", "",
              f"The first {SAMPLE_CHARACTERS} characters of each mixer's first sample "
              "(temperature 0.8, cached decoding from a newline; `samples.txt` in each "
              "workdir)."]
    for row, (seed, text) in samples:
      lines += ["", f"**{row.entry.mixer}** (seed {seed})", "", "```", text.rstrip(), "```"]
  path.write_text("\n".join(lines) + "\n")

  def csv_row(row: Row) -> dict[str, Any]:
    out = {"entry": row.entry.key, "group": row.entry.group, "n": len(row.done),
           "status": row.status}
    for name in ("loss", "bits_per_char", "accuracy", "sequence_accuracy",
                 "train_tokens_per_second", "decode_tokens_per_second", "num_params"):
      values = row.values(name)
      out[name] = " ".join(f"{v:.6g}" for v in values)
    return out

  csv_path = grids.write_csv(
      path.with_suffix(".csv"),
      ["entry", "group", "n", "status", "loss", "bits_per_char", "accuracy",
       "sequence_accuracy", "train_tokens_per_second", "decode_tokens_per_second",
       "num_params"], map(csv_row, rows))
  return {"md": path, "csv": csv_path}


def _summary(results: dict[str, Any]) -> str:
  test = results.get("test", {})
  return " ".join(f"test {k}={v:.4g}" for k, v in test.items() if not k.startswith("accuracy_"))


GRID = grids.entry_grid(
    "lm", default_workdir=DEFAULT_WORKDIR, default_report=DEFAULT_REPORT,
    entries=entries, cpu_keys=CPU_KEYS, runs=runs, collect=collect, write_report=write_report,
    describe=lambda run: f"{run.entry.key} seed {run.seed}", summarize=_summary)
