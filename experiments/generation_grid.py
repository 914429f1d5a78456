r"""The generation reproduction: DiT, LiT and VAR on MNIST, scored by the reference classifier,
with seeds; the CIFAR-10 GPU entries when named.

`python -m experiments.reproduce generation` (thin CLI in experiments/reproduce.py) calls
`GRID.train`, which trains every unfinished run of the chosen entries (one workdir per entry
and seed under --workdir; a finished run is skipped, a half-finished one resumes) and writes
`experiments/results/generation.md` and `.csv` after each run. Per entry, as mean ± sample std
over the seeds that finished (n):

  guided class accuracy         the fraction of class-conditional samples (guidance as the config
                                sets it) that the reference classifier labels with their class;
                                VAR also without guidance
  classifier Frechet distance   the Frechet distance between real test images and samples in the
                                reference classifier's penultimate feature space (FID's formula
                                in another network's features: NOT FID, comparable only within
                                paperzoo and only under the same reference classifier)
  FID                           standard FID, shown only where a run was given Inception
                                weights (`task.inception_weights`, paperzoo.generation.inception)
  bits/dim                      DDPM's variational bound on the test split (the stratified
                                estimate over the config's evaluation timesteps)
  PSNR, codebook usage          the tokenizer's test reconstructions (uint8) and the fraction of
                                its codes some test token uses
  test accuracy                 the reference classifier's own accuracy on the held-out split

with the target where the entry sets one (guided class accuracy >= 90% for DiT-tiny and
VAR-tiny on MNIST, >= 70% for the CIFAR-10 GPU models) and whether the mean meets it, the exact
`experiments.run` command of every run, when and with which jax and devices it ran, and links to
the runs' pictures, which `write_report` copies (palette-compressed) into a folder named after
the report (`experiments/results/generation/`), so the links resolve inside the repository.

Runs read other runs, and the grid trains those first like any config does
(`experiments.prerequisites`, under the same per-run lock):
  * The reference classifier scores every sample: the one run in
    `cache_dir("reference_classifiers")/<data>` (`paperzoo.generation.metrics.reference_run`).
    The grid's reference entry is that very run (one run, whatever --seeds says), so the table
    shows the classifier that actually scored the samples; when the finished run there was
    trained with another config than today's `reference_classifier.py` (e.g. another seed), the
    report says so instead of retraining it (retraining would change every sample score). In
    fast mode it is a runlocal run under the grid's workdir, never the shared cache.
  * VAR seed s reads the tokenizer entry's run of seed s (`tokenizer_workdir=<that workdir>`);
    when the tokenizer entry has not run yet, the VAR run trains it there first.

Fast mode (`fast=True`, `--fast`): every run is its config's `runlocal` smoke setting, under
`<workdir>/fast`; runlocal DiT, LiT and VAR score no samples (`samples_per_class=0`), so their
rows show no sample scores; the report says it is not the protocol.

The training loop, run states (done / stale / failed / started) and the workdir check are
those every grid shares (`experiments.grids`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

from experiments import configs
from experiments import grids
from experiments import run_ledger
from paperzoo import config as config_lib
from paperzoo import workdir as workdir_lib
from paperzoo.generation import metrics

REPO_ROOT = grids.REPO_ROOT
DEFAULT_WORKDIR = pathlib.Path("/tmp/paperzoo_reproduce_generation")
DEFAULT_REPORT = REPO_ROOT / "experiments" / "results" / "generation.md"
KINDS = ("classifier", "diffusion", "tokenizer", "next_scale")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of the table: a config with its arguments (seed and workdirs are added per run)."""

  key: str
  group: str
  kind: str  # one of KINDS: which scores its results hold
  model: str  # what it is, for the table
  config: str
  arg: str
  data: str
  target: float | None = None  # the guided class accuracy in [0, 1] to reach
  tokenizer: str | None = None  # the entry whose run of the same seed is this one's tokenizer
  pictures: tuple[str, ...] = ()  # files of a finished run's workdir copied next to the report


_MNIST = "MNIST 28x28 (8k train / 2k held out), CPU"
_CIFAR = "CIFAR-10 32x32, one GPU (run only when named)"

ENTRIES: tuple[Entry, ...] = (
    Entry("mnist/reference_classifier", _MNIST, "classifier",
          "reference CNN: scores every MNIST sample below", "reference_classifier",
          "data=mnist", "mnist", pictures=("confusion_matrix.png",)),
    Entry("mnist/dit/flow", _MNIST, "diffusion",
          "DiT-tiny/4 (4 blocks x 96), flow matching; Euler 25 steps, guidance 4", "dit",
          "data=mnist", "mnist", target=0.90, pictures=("samples.png",)),
    Entry("mnist/dit/ddpm", _MNIST, "diffusion",
          "DiT-tiny/4 (4 blocks x 96), DDPM with learned variance; DDIM 25 steps, guidance 4",
          "dit", "data=mnist,objective=ddpm", "mnist", target=0.90, pictures=("samples.png",)),
    Entry("mnist/lit", _MNIST, "diffusion",
          "LiT-tiny/4: DiT-tiny/4 with linear attention, flow matching", "dit",
          "data=mnist,mixer=linear", "mnist", pictures=("samples.png",)),
    Entry("mnist/var_tokenizer", _MNIST, "tokenizer",
          "VAR's multi-scale residual VQ tokenizer (scales 1-2-3-4-6-8, 256 codes)",
          "var_tokenizer", "data=mnist", "mnist", pictures=("reconstructions.png",)),
    Entry("mnist/var", _MNIST, "next_scale",
          "VAR-tiny (4 blocks x 64) on mnist/var_tokenizer's tokens; guidance 2, top-p 0.9",
          "var", "data=mnist", "mnist", target=0.90, tokenizer="mnist/var_tokenizer",
          pictures=("samples.png",)),
    Entry("cifar10/reference_classifier", _CIFAR, "classifier",
          "reference CNN: scores every CIFAR-10 sample below", "reference_classifier",
          "data=cifar10", "cifar10", pictures=("confusion_matrix.png",)),
    Entry("cifar10/dit_s2", _CIFAR, "diffusion",
          "DiT-S/2, DDPM with learned variance; 250 respaced steps, guidance 1.5", "dit",
          "data=cifar10,size=S,patch=2", "cifar10", target=0.70, pictures=("samples.png",)),
    Entry("cifar10/var_tokenizer", _CIFAR, "tokenizer",
          "VAR's multi-scale residual VQ tokenizer (1,024 codes)", "var_tokenizer",
          "data=cifar10", "cifar10", pictures=("reconstructions.png",)),
    Entry("cifar10/var", _CIFAR, "next_scale",
          "VAR-S on cifar10/var_tokenizer's tokens; linear guidance 1.5, top-k 225, top-p 0.96",
          "var", "data=cifar10", "cifar10", target=0.70, tokenizer="cifar10/var_tokenizer",
          pictures=("samples.png",)),
)
_BY_KEY = {e.key: e for e in ENTRIES}
# What runs on a 2-core CPU (about 15 minutes per run): the MNIST entries.
CPU_KEYS = tuple(e.key for e in ENTRIES if "GPU" not in e.group)


def entries(keys: Iterable[str] | None = None) -> list[Entry]:
  """The entries whose key equals or starts with one of `keys`, in table order (all when None;
  a prefix that also reaches CPU entries selects only those: `grids.select_entries`)."""
  return grids.select_entries(ENTRIES, keys, CPU_KEYS)


# ---------------------------------------------------------------------------------------------
# Runs.

@dataclasses.dataclass(frozen=True)
class GenerationRun:
  """One training run: an entry with a seed (None: the entry's single run) and a workdir."""

  entry: Entry
  seed: int | None
  workdir: pathlib.Path
  fast: bool = False
  tokenizer_workdir: pathlib.Path | None = None  # the tokenizer run it reads (VAR)
  # The reference classifier shared by every sample score (protocol mode): the finished run
  # there is what scores samples, whatever config it was trained with.
  shared_reference: bool = False
  ledger: run_ledger.Ledger | None = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def key(self) -> str:
    """The run's name in the ledger: its workdir below the grid's root (the shared reference
    classifier's below the cache)."""
    if self.shared_reference:
      return f"reference_classifiers/{self.entry.data}"
    return "/".join([("fast" if self.fast else "protocol"), self.entry.key]
                    + ([] if self.seed is None else [f"seed{self.seed}"]))

  @property
  def label(self) -> str:
    return "" if self.seed is None else f"seed {self.seed}"

  @property
  def config_arg(self) -> str:
    parts = [self.entry.arg]
    if self.seed is not None:
      parts.append(f"seed={self.seed}")
    if self.tokenizer_workdir is not None:
      parts.append(f"tokenizer_workdir={self.tokenizer_workdir}")
    if self.fast:
      parts.append("runlocal")
    return ",".join(parts)

  @property
  def command(self) -> str:
    return grids.run_command(self.workdir, self.entry.config, self.config_arg)

  def today_config(self):
    """The config today's `experiments/configs/<config>.py` builds for this run."""
    return configs.load(self.entry.config, self.config_arg)

  def config(self):
    """The config this run trains (or was trained) with: the shared reference classifier's
    finished run counts with the config it saved."""
    if self.shared_reference and workdir_lib.is_done(self.workdir):
      return workdir_lib.read_config(self.workdir)
    return self.today_config()


def runs(chosen: Sequence[Entry], *, seeds: int | Sequence[int], workdir: str | os.PathLike,
         fast: bool = False, ledger: run_ledger.Ledger | None = None) -> list[GenerationRun]:
  """The runs of `chosen` in order (entry, then seed): one per seed, one for a classifier."""
  root = grids.check_workdir(workdir) / ("fast" if fast else "protocol")
  result = []
  for entry in chosen:
    if entry.kind == "classifier":
      result.append(
          GenerationRun(entry, None, root / entry.key, fast, ledger=ledger) if fast else
          GenerationRun(entry, None, metrics.shared_reference_workdir(entry.data),
                        shared_reference=True, ledger=ledger))
      continue
    for seed in grids.seeds_list(seeds):
      tokenizer = None if entry.tokenizer is None else root / entry.tokenizer / f"seed{seed}"
      result.append(GenerationRun(entry, seed, root / entry.key / f"seed{seed}", fast,
                                  tokenizer, ledger=ledger))
  return result


def run_state(run: GenerationRun) -> grids.RunState:
  """The shared run states; the shared reference classifier known only from the ledger counts
  as done whatever its config (as when its workdir is there)."""
  state = grids.run_state(run)
  if (run.shared_reference and state.status == "stale"
      and not (run.workdir / "results.json").exists()):
    # `_reference_note` says that its workdir is gone.
    return grids.RunState("done", state.results, finished=state.finished)
  return state


# ---------------------------------------------------------------------------------------------
# Scores.

# name -> (column title, scale for display, decimals). Accuracies and usage are shown in %.
METRICS: dict[str, tuple[str, float, int]] = {
    "test_accuracy": ("test accuracy %", 100.0, 2),
    "class_accuracy": ("guided class accuracy %", 100.0, 1),
    "class_accuracy_unguided": ("unguided class accuracy %", 100.0, 1),
    "classifier_frechet_distance": ("classifier Frechet distance (not FID)", 1.0, 1),
    "fid": ("FID (Inception, user-supplied weights)", 1.0, 2),
    "bits_per_dim": ("test bits/dim", 1.0, 3),
    "psnr": ("test PSNR dB", 1.0, 2),
    "codebook_usage": ("test codebook usage %", 100.0, 1),
}
# The columns of each kind's table.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classifier": ("test_accuracy",),
    "diffusion": ("class_accuracy", "classifier_frechet_distance", "bits_per_dim"),
    "next_scale": ("class_accuracy", "class_accuracy_unguided", "classifier_frechet_distance"),
    "tokenizer": ("psnr", "codebook_usage"),
}
KIND_TITLES = {
    "classifier": "Reference classifiers (they score every sample)",
    "diffusion": "Diffusion transformers: DiT and LiT",
    "next_scale": "Next-scale prediction: VAR",
    "tokenizer": "VAR tokenizers",
}


def run_metrics(results: dict[str, Any]) -> dict[str, float]:
  """The scores of METRICS a finished run's results.json holds (where the task writes them:
  sample scores and the tokenizer's exact test scores in `final_metrics`, bits/dim and the
  classifier's accuracy in `test`)."""
  final = results.get("final_metrics") or {}
  test = results.get("test") or {}
  found = {
      "test_accuracy": test.get("accuracy") if results.get("task") == "classification" else None,
      "class_accuracy": final.get("class_accuracy"),
      "class_accuracy_unguided": final.get("class_accuracy_unguided"),
      "classifier_frechet_distance": final.get("classifier_frechet_distance"),
      "fid": final.get("fid"),  # only when the run was given Inception weights
      "bits_per_dim": test.get("bits_per_dim"),
      "psnr": final.get("test_psnr_uint8"),
      "codebook_usage": final.get("test_codebook_usage"),
  }
  return {name: float(value) for name, value in found.items() if value is not None}


def _summary(values: dict[str, float]) -> str:
  return ", ".join(f"{METRICS[name][0]}={_number(name, value)}"
                   for name, value in values.items()) or "no scores"


def _number(name: str, value: float) -> str:
  _, scale, digits = METRICS[name]
  return f"{scale * value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Collecting what the workdirs hold.

@dataclasses.dataclass
class RunRecord:
  run: GenerationRun
  state: grids.RunState
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  finished: float | None = None  # when results.json was written (None: unknown)
  # (picture name, its copy beside the report), filled by write_report
  pictures: list[tuple[str, pathlib.Path]] = dataclasses.field(default_factory=list)
  note: str = ""  # e.g. how the shared reference classifier differs from today's config


@dataclasses.dataclass
class Row:
  entry: Entry
  records: list[RunRecord]
  status: str
  notes: list[str]

  @property
  def done(self) -> list[RunRecord]:
    return [r for r in self.records if r.state.status == "done"]

  def values(self, name: str) -> list[float]:
    return [r.metrics[name] for r in self.done if name in r.metrics]

  def mean_std(self, name: str) -> tuple[float, float]:
    return grids.mean_std(self.values(name))

  @property
  def meets_target(self) -> bool | None:
    """The mean guided class accuracy reaches the target; None without target or scores."""
    values = self.values("class_accuracy")
    if self.entry.target is None or not values:
      return None
    return self.mean_std("class_accuracy")[0] >= self.entry.target - 1e-12


def collect(chosen: Sequence[Entry], *, seeds: int | Sequence[int],
            workdir: str | os.PathLike, fast: bool = False,
            ledger: run_ledger.Ledger | None = None) -> list[Row]:
  """Each entry's runs and the scores of the finished, up-to-date ones, from the workdirs,
  then `ledger` (stale and failed runs are named, not averaged)."""
  by_entry: dict[str, list[GenerationRun]] = {}
  for run in runs(chosen, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger):
    by_entry.setdefault(run.entry.key, []).append(run)
  rows = []
  for entry in chosen:
    records = []
    for run in by_entry[entry.key]:
      state = run_state(run)
      record = RunRecord(run, state)
      if state.status == "done":
        record.metrics = run_metrics(state.results)
        record.finished = state.finished
        if run.shared_reference:
          record.note = _reference_note(run)
      records.append(record)
    counts: dict[str, int] = {}
    for record in records:
      counts[record.state.status] = counts.get(record.state.status, 0) + 1
    status = ("done" if counts.get("done") == len(records) else
              ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    notes = []  # the first run's detail per status (every run's is under "Every run")
    for kind in sorted(counts):
      detailed = [r for r in records if r.state.status == kind and r.state.detail]
      if kind not in ("done", "not run") and detailed:
        more = f" (and {len(detailed) - 1} more)" if len(detailed) > 1 else ""
        notes.append(f"{detailed[0].run.label or 'run'} {kind}: {detailed[0].state.detail}"
                     f"{more}")
    notes += [r.note for r in records if r.note]
    rows.append(Row(entry, records, status, notes))
  return rows


def _reference_note(run: GenerationRun) -> str:
  """How the shared reference classifier's run differs from today's config, if it does."""
  if not (run.workdir / "config.json").exists():  # known from the ledger only
    record = run.ledger.get(run.key) if run.ledger is not None else None
    today = run_ledger.config_digest(run_ledger.config_dict(run.today_config()))
    other = record is not None and record.config_digest != today
    return (f"recorded in the ledger; its workdir {grids.display_path(run.workdir)} is gone, so "
            "the next sample "
            "scores train a new classifier" + (" (this one was trained with another config "
                                               "than today's)" if other else ""))
  try:
    saved = json.loads((run.workdir / "config.json").read_text())
    today = json.loads(run.today_config().to_json_best_effort())
  except Exception as error:  # pylint: disable=broad-except  (a note, never a failure)
    return f"could not compare with today's config: {type(error).__name__}: {error}"
  differences = run_ledger.config_differences(saved, today)
  if not differences:
    return ""
  shown = ", ".join(f"{k}={config_lib.lookup(saved, k)[1]!r} "
                    f"(today {config_lib.lookup(today, k)[1]!r})"
                    for k in differences[:4])
  return (f"the classifier in {grids.display_path(run.workdir)} (the one that scores samples) "
          "was trained with "
          f"{shown}{' ...' if len(differences) > 4 else ''}; kept, since retraining it changes "
          "every sample score (delete the folder to retrain)")


# ---------------------------------------------------------------------------------------------
# Report.

def _fmt(row: Row, name: str) -> str:
  values = row.values(name)
  if not values:
    return "-"
  mean, std = row.mean_std(name)
  _, scale, digits = METRICS[name]
  spread = "" if math.isnan(std) else f" ± {scale * std:.{digits}f}"
  return f"{scale * mean:.{digits}f}{spread} (n={len(values)})"


def _target(row: Row) -> str:
  return "-" if row.entry.target is None else f">= {100 * row.entry.target:.0f}%"


def _meets(row: Row, fast: bool) -> str:
  if row.entry.target is None:
    return "-"
  if fast:
    return "n/a (fast mode)"
  met = row.meets_target
  if met is None:
    return "not run" if not row.done else "no sample scores"
  partial = "" if len(row.done) == len(row.records) else (
      f", {len(row.done)} of {len(row.records)} seeds")
  return ("yes" if met else "**no**") + partial


def _ran(row: Row) -> str:
  """When the finished runs ended, with which jax and on which devices (from results.json)."""
  done = row.done
  if not done:
    return "-"
  last = grids.format_date(max((r.finished for r in done if r.finished is not None),
                               default=None))
  versions = sorted({str(r.state.results.get("jax_version", "?")) for r in done})
  devices = sorted({str(r.state.results.get("devices", "?")) for r in done})
  return f"{last}; jax {', '.join(versions)}; {', '.join(devices)}"


def _status_text(row: Row) -> str:
  return "; ".join([row.status] + row.notes)


def write_report(rows: Sequence[Row], path: str | os.PathLike, *, command: str,
                 fast: bool = False) -> dict[str, pathlib.Path]:
  """Markdown and CSV (beside it), and the finished runs' pictures copied into
  `grids.picture_dir(path)`; returns the paths of the two files."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  pictures = grids.picture_dir(path)

  def links(copies: Sequence[tuple[str, pathlib.Path]]) -> str:
    return grids.picture_links(copies, path.parent)

  for row in rows:
    for record in row.done:
      record.pictures = grids.copy_pictures(
          record.run.workdir, record.run.entry.pictures, pictures,
          entry_key=record.run.entry.key, seed=record.run.seed)
  lines = grids.report_header(
      "Image generation: DiT, LiT and VAR", command=command,
      finished=[r.finished for row in rows for r in row.done],
      seeds=sorted({r.run.seed for row in rows for r in row.records if r.run.seed is not None}),
      fast=fast, seeds_note="; the reference classifier is one run. Each row says when its "
      "runs finished, with which jax, on which devices")
  if fast:
    lines.append("- Runlocal DiT, LiT and VAR score no samples.")
  lines += [
      "- Guided class accuracy: the fraction of class-conditional samples (the config's "
      "samples per class, sampler and guidance) that the data set's reference classifier labels "
      "with their class. Classifier Frechet distance: the Frechet distance between real test "
      "images and the samples in that classifier's penultimate feature space; it is NOT FID "
      "(another network's features) and compares runs only within paperzoo under the same "
      "reference classifier. bits/dim: DDPM's variational bound on the test split, estimated "
      "over the config's evaluation timesteps. PSNR (uint8) and codebook usage (the fraction "
      "of codes some test token uses): the tokenizer's best checkpoint on the test split.",
      "- Target: guided class accuracy >= 90% for DiT-tiny and VAR-tiny on MNIST (CPU-sized "
      "runs), >= 70% for DiT-S/2 and VAR on CIFAR-10 (one GPU); met = the mean over seeds "
      "reaches it.",
  ]
  for kind in KINDS:
    kind_rows = [row for row in rows if row.entry.kind == kind]
    if not kind_rows:
      continue
    names = KIND_METRICS[kind] + (("fid",) if any(row.values("fid") for row in kind_rows)
                                  else ())
    with_target = any(row.entry.target is not None for row in kind_rows)
    header = (["entry", "model"] + [METRICS[n][0] for n in names]
              + (["target", "met"] if with_target else [])
              + ["status", "finished; jax; devices", "pictures", "command"])
    lines += ["", f"## {KIND_TITLES[kind]}", ""]
    lines += grids.markdown_table(header, (
        [row.entry.key, row.entry.model] + [_fmt(row, n) for n in names]
        + ([_target(row), _meets(row, fast)] if with_target else [])
        + [_status_text(row), _ran(row), links(row.done[0].pictures if row.done else []),
           f"`{row.records[0].run.command}`"] for row in kind_rows))
  lines += ["", "## Every run", ""]
  for row in rows:
    for record in row.records:
      run = record.run
      name = " ".join(filter(None, [run.entry.key, run.label]))
      if record.state.status != "done":
        detail = f": {record.state.detail}" if record.state.detail else ""
        lines.append(f"- {name}: {record.state.status}{detail}. `{run.command}`")
        continue
      results = record.state.results
      seconds = sum(float(v) for v in (results.get("seconds") or {}).values())
      lines.append(
          f"- {name}: {_summary(record.metrics)}; {results.get('steps', '?')} steps, "
          f"{seconds:.0f} s (compile + train + eval); finished "
          f"{grids.format_date(record.finished)}, jax {results.get('jax_version', '?')}, "
          f"{results.get('devices', '?')}; pictures {links(record.pictures)}; "
          f"workdir `{grids.display_path(run.workdir)}`. `{run.command}`")
  lines += ["", f"CSV with the per-seed scores and every command: `{path.with_suffix('.csv').name}`"
            f"; pictures: `{os.path.relpath(pictures, path.parent)}/`.", ""]
  path.write_text("\n".join(lines))

  fields = ["mode", "entry", "group", "kind", "model", "seeds_requested", "seeds_done", "n"]
  for name in METRICS:
    fields += [f"{name}_mean", f"{name}_std", f"{name}_per_seed"]
  fields += ["target_class_accuracy", "meets_target", "status", "last_finished",
             "jax_versions", "devices", "pictures", "commands"]

  def csv_row(row: Row) -> dict[str, Any]:
    met = row.meets_target
    line = {
        "mode": "fast" if fast else "protocol", "entry": row.entry.key,
        "group": row.entry.group, "kind": row.entry.kind, "model": row.entry.model,
        "seeds_requested": " ".join(str(r.run.seed) for r in row.records
                                    if r.run.seed is not None),
        "seeds_done": " ".join(str(r.run.seed) for r in row.done if r.run.seed is not None),
        "n": len(row.done),
        "target_class_accuracy": "" if row.entry.target is None else row.entry.target,
        "meets_target": "" if met is None or fast else ("yes" if met else "no"),
        "status": _status_text(row),
        "last_finished": (grids.format_date(max(
            (r.finished for r in row.done if r.finished is not None), default=None))
                          if row.done else ""),
        "jax_versions": " ".join(sorted({str(r.state.results.get("jax_version", ""))
                                         for r in row.done})),
        "devices": " ".join(sorted({str(r.state.results.get("devices", ""))
                                    for r in row.done})),
        "pictures": " ".join(os.path.relpath(copy, path.parent)
                             for r in row.done for _, copy in r.pictures),
        "commands": " ; ".join(r.run.command for r in row.records),
    }
    for name in METRICS:
      values = row.values(name)
      mean, std = row.mean_std(name)
      line[f"{name}_mean"] = "" if not values else f"{mean:.6g}"
      line[f"{name}_std"] = "" if math.isnan(std) else f"{std:.6g}"
      line[f"{name}_per_seed"] = " ".join(f"{v:.6g}" for v in values)
    return line

  csv_path = grids.write_csv(path.with_suffix(".csv"), fields, map(csv_row, rows))
  return {"md": path, "csv": csv_path}


GRID = grids.entry_grid(
    "generation", default_workdir=DEFAULT_WORKDIR, default_report=DEFAULT_REPORT,
    entries=entries, cpu_keys=CPU_KEYS, runs=runs, collect=collect, write_report=write_report,
    describe=lambda run: " ".join(filter(None, [run.entry.key, run.label])),
    summarize=lambda results: _summary(run_metrics(results)))
