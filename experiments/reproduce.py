r"""Reproduces the papers' tables: the command line, kept thin (the grid is importable).

  python -m experiments.reproduce forecasting [--models=dlinear,itransformer]
      [--datasets=etth1,etth2,exchange,illness] [--horizons=96,192] [--seeds=3]
      [--workdir=/tmp/paperzoo_reproduce] [--report=experiments/results/forecasting.md]

trains every unfinished run of the grid (models x data sets x horizons x seeds; ILI uses its own
lookback 36 and horizons 24/36/48/60), skipping finished ones and resuming half-finished ones,
and writes the report after each run: `experiments/results/forecasting.md`, `.csv` and `.png`,
covering the whole grid (cells not run say so). `--report_only` writes the report from what the
workdirs hold, training nothing. `--fast` runs each config's `runlocal` smoke setting (two
steps) under `<workdir>/fast` and labels the report as not the protocol; its report goes to
`<workdir>/fast/forecasting.md` unless `--report` says otherwise. There is no switch that
shortens training inside the protocol.

Every report keeps a ledger beside it (`forecasting_runs.jsonl` beside `forecasting.md`, see
`experiments/run_ledger.py`): each finished run's results, recorded when the report is written.
The report reads a run's workdir first and the ledger second, so rewriting a report after the
workdirs are gone (a cleared /tmp) keeps every result; those runs are not retrained. Every
report covers its whole table (all models; for classification and generation every CPU entry
and the ones named) with at least seeds 2021-2023, so a run of a few entries or one seed
updates its rows and leaves the others as they were.

Several processes may work on one grid at once: give each the same command (one per GPU, or
one per core where a single run uses several cores poorly). A run being trained holds a lock
(`paperzoo.workdir.lock`), so the others pass over it to the next free run ("busy" in their
summary), and each takes the report's lock before it rewrites the report and ledger
(`run_ledger.report_lock`). On a 2-core CPU, for example:

  export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  taskset -c 0 python -m experiments.reproduce classification --entries=lra/listops &
  taskset -c 1 python -m experiments.reproduce classification --entries=lra/listops &

  python -m experiments.reproduce classification [--entries=uea,mnist,lra/listops]
      [--seeds=3] [--workdir=/tmp/paperzoo_reproduce_classification]
      [--report=experiments/results/classification.md]

trains the classification entries (Long Range Arena at CPU size, the MNIST variants of the
vision backbones, UEA under both selection protocols; `--entries` takes keys or key prefixes,
default every entry that fits a CPU; the full-size LRA and CIFAR-10 entries run only under a
key that reaches no CPU entry, e.g. `--entries=cifar10,lra/listops/attention/full`, so
`--entries=lra` stays on the CPU sizes) and writes `experiments/results/classification.md`
and `.csv`: test accuracy mean ± std over seeds, the published number, the command.

  python -m experiments.reproduce generation [--entries=mnist/dit,mnist/var] [--seeds=3]
      [--workdir=/tmp/paperzoo_reproduce_generation]
      [--report=experiments/results/generation.md]

trains the generation entries (the MNIST reference classifier, DiT-tiny with flow matching and
with DDPM, LiT, VAR's tokenizer and VAR-tiny, about 15 CPU minutes per run; a VAR run reads the
tokenizer entry's run of the same seed and trains it first when it has not run; the CIFAR-10
GPU entries run only when named, e.g. `--entries=cifar10`) and writes
`experiments/results/generation.md` and `.csv`: guided class accuracy of the samples under the
reference classifier, the Frechet distance in that classifier's feature space (not FID), DDPM's
bits/dim, the tokenizer's PSNR and codebook usage, mean ± std over seeds, the target and
whether it is met, each run's command, and links to the sample grids, copied into
`experiments/results/generation/`. The reference classifier is the one run that scores every
sample (`cache_dir("reference_classifiers")/<data>`), not one per seed. `--report_only`,
`--fast` (report in `<workdir>/fast/generation.md`) and `--rerun_stale` work as for
forecasting.

  python -m experiments.reproduce lm [--entries=shakespeare,mqar] [--seeds=3]
      [--workdir=/tmp/paperzoo_reproduce_lm] [--report=experiments/results/language_model.md]

trains the language-model entries (`shakespeare/<mixer>`: nanoGPT's CPU configuration with each
of the five causal mixers; `mqar/<mixer>/L<length>` and `passkey/<mixer>/L<length>`: the recall
probes; `long/attention`: the 2,048-character model; `gpu/attention` only when named) and writes
`experiments/results/language_model.md` and `.csv`: validation loss and bits per character,
training and decoding characters per second, parameters, the probes' accuracies with their
plots, and samples.

The logic lives in `experiments/forecasting_grid.py`, `experiments/classification_grid.py`,
`experiments/generation_grid.py` and `experiments/language_model_grid.py` (each module's `GRID`:
`GRID.train`, `GRID.update_report`, and its `runs`, `collect` and `write_report`), which a
notebook calls directly; what they share (run states, the training loop, report pieces) is in
`experiments/grids.py`.

Exit status (`experiments.cli`): 0 when every chosen run finished or was skipped; 75 when a
run was preempted (SIGTERM: saved; the same command resumes it later); 1 when a run failed (its
error.txt says why; the same command retries it); 2 for a wrong flag.
"""

from __future__ import annotations

import sys

from absl import flags
from absl import logging

from experiments import classification_grid
from experiments import cli
from experiments import forecasting_grid
from experiments import generation_grid
from experiments import grids
from experiments import language_model_grid
from paperzoo import config as config_lib

_MODELS = flags.DEFINE_list(
    "models", None, "Models (config names in experiments/configs); default: every forecasting "
    "config with a paper number or listed as a baseline.")
_DATASETS = flags.DEFINE_list("datasets", None,
                              f"Data sets; default: {','.join(forecasting_grid.PROTOCOL)}.")
_HORIZONS = flags.DEFINE_list("horizons", None, "Only these horizons (of each data set's "
                              "protocol horizons); default: all.")
_SEEDS = flags.DEFINE_integer("seeds", 3, f"Seeds per cell: {grids.FIRST_SEED}, "
                              f"{grids.FIRST_SEED + 1}, ...")
_SEED_LIST = flags.DEFINE_list("seed_list", None, "Explicit seeds instead of --seeds.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root of the runs' workdirs (outside the "
                               "repository); default: the grid's, under /tmp.")
_REPORT = flags.DEFINE_string(
    "report", None, "Markdown report (.csv and more beside it); default "
    "experiments/results/<grid>.md, or <workdir>/fast/<grid>.md with --fast.")
_FAST = flags.DEFINE_bool("fast", False, "Smoke mode: each config's runlocal setting (two "
                          "steps); kept apart from protocol runs and labelled in the report.")
_RERUN_STALE = flags.DEFINE_bool("rerun_stale", False, "Retrain finished runs whose config has "
                                 "changed since (the old workdir is kept as seed<N>.staleK).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report; train nothing.")
_ENTRIES = flags.DEFINE_list("entries", None, "classification, generation, lm: entry keys or "
                             "key prefixes (e.g. uea,mnist/vit or mnist/dit,mnist/var); default: "
                             "every entry that fits a CPU.")

GRIDS = {grid.name: grid for grid in (forecasting_grid.GRID, classification_grid.GRID,
                                     generation_grid.GRID, language_model_grid.GRID)}


def selection(name: str):
  """What the flags choose of grid `name`: cells of the forecasting grid, entry keys of the
  others (default: every entry that fits a CPU)."""
  if name == "forecasting":
    horizons = [int(h) for h in _HORIZONS.value] if _HORIZONS.value else None
    return forecasting_grid.Cells(_MODELS.value or (), _DATASETS.value or (), horizons)
  return _ENTRIES.value or None


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in GRIDS:
    raise config_lib.ConfigError(
        f"usage: python -m experiments.reproduce {{{','.join(GRIDS)}}} [--flags]; got "
        f"{' '.join(argv[1:]) or 'no subcommand'}")
  logging.set_verbosity(logging.WARNING)
  grid = GRIDS[argv[1]]
  seeds = [int(s) for s in _SEED_LIST.value] if _SEED_LIST.value else _SEEDS.value
  workdir = grids.check_workdir(_WORKDIR.value or grid.default_workdir)
  report = _REPORT.value or (workdir / "fast" / f"{grid.name}.md" if _FAST.value
                             else grid.default_report)
  if _REPORT_ONLY.value:
    paths = grid.update_report(selection(grid.name), seeds=seeds, workdir=workdir,
                               fast=_FAST.value, report=report)
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return
  outcome = grid.train(selection(grid.name), seeds=seeds, workdir=workdir, fast=_FAST.value,
                       report=report, rerun_stale=_RERUN_STALE.value)
  print("; ".join(f"{k}: {len(v)}" for k, v in outcome.items()) + f". Report: {report}")
  if outcome["preempted"]:
    sys.exit(cli.PREEMPTED)
  if outcome["failed"]:
    sys.exit(cli.ERROR)


if __name__ == "__main__":
  cli.run(main)
