"""Tasks: what is learned from which data, and how it is scored.

A task is a class registered in `paperzoo.registry.TASKS`, built as `Task(config)`. The trainer
needs exactly this from it:

  data_kinds: tuple[str, ...]      the kinds of data set it takes (`paperzoo.registry.
                                   DATA_KINDS`); the trainer refuses a data set of another kind
                                   before any compute
  splits: dict[str, dataset]       "train", "val", "test"; each dataset has `__len__` and
                                   `get_batch(indices) -> dict[str, np.ndarray]`
  selection_metric, selection_mode the validation metric for early stopping and the best
                                   checkpoint, and "min" or "max"
  model_kwargs() -> dict           shape information the model's constructor takes
  loss(model, batch, *, train, rngs) -> (scalar loss, dict of scalar metrics)
  eval_sums(model, batch) -> dict  per-batch sums of the evaluation statistics; `batch["mask"]`
                                   is 1 for real examples and 0 for padding
  summarize(sums) -> dict          metrics from the sums over a whole split
  write_pictures(predict, workdir) task-specific plots; `predict(batch)` runs the model

Optional:
  required_runs(config) -> list    (a staticmethod) the finished runs the task reads, as
                                   `paperzoo.workdir.RequiredRun`s (workdir, and the config
                                   that trains it): a VAR tokenizer, a reference classifier.
                                   The trainer checks them before any compute; a task never
                                   trains them (`python -m experiments.run` does, first)
  final_metrics(predict, workdir) -> dict   scores that need the trained model beyond the
                                   evaluation sums (e.g. of generated samples); called once
                                   after the final test with the best checkpoint's `predict`,
                                   stored as results["final_metrics"] in results.json
  selection: str                   the split that selects the best checkpoint, as reported
                                   in results.json ("validation" when absent)

Everything is jit-compiled by the trainer, so `loss` and `eval_sums` must be traceable.
"""

import importlib
import pkgutil

# Every module here registers its task when imported (on the first registry lookup), so a new
# task is one new file, with no list to edit.
for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
