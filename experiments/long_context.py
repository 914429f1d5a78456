r"""Block-sparse prefill on the long-context character model: how much of the attention each
selector keeps, what that costs in quality, and what it saves in time.

  python -m experiments.long_context \
      [--workdir=/tmp/paperzoo_reproduce_lm/protocol/long/attention/seed2021] \
      [--methods=xattention,minference] [--thresholds=0.5,0.7,0.9,0.95] [--lines=64,256] \
      [--speed_lengths=2048,8192] \
      [--report=experiments/results/long_context.md]

The model is the language-model grid's `long/attention` run (4 layers, width 128, 4 heads of 32,
rotary positions, context 2,048, passkeys in a quarter of its training windows; train it with
`python -m experiments.reproduce lm --entries=long --seeds=1`). Its best checkpoint is restored
with `model.sparse_prefill` set (`paperzoo.sparse_attention`), so every attention layer's
parallel pass outside training runs block-sparse attention over the blocks the selector keeps
(blocks of 64 queries and keys), and is scored, for dense attention and each method setting
(XAttention at each `--thresholds`, MInference's vertical-slash pattern with each `--lines`
vertical and slash lines, estimated from the last 64 queries):
  * density: the kept fraction of the causally visible key blocks, averaged over layers, heads
    and the first `--density_windows` validation windows;
  * validation bits per character over the whole validation split (windows of 2,048; the
    first `--val_windows` with that flag, and the report says so), and the change from dense
    attention;
  * passkey accuracy by depth on the run's passkey probe (250 held-out windows);
  * prefill attention time at each of `--speed_lengths` (one layer's attention on the first
    layer's real queries and keys of validation text, batch 1): dense causal attention
    (`jax.nn.dot_product_attention`, XLA) against the selector plus block-sparse attention
    (the `xla` path on the selected blocks, padded to the longest row), each the best of
    `--repeats` timed calls after compilation, in one run.
The report (`--report`) is rewritten at the end, with the machine, versions, date and command,
and its rows in JSON beside it (`long_context.json`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from experiments import cli
from experiments import grids
from paperzoo import config as config_lib
from paperzoo import workdir as workdir_lib
from paperzoo.sparse_attention import (SPARSE_PREFILL, causal_block_mask,
                                       make_block_selector)
from pallas_kernels.block_sparse_attention import block_sparse_attention

DEFAULT_WORKDIR = "/tmp/paperzoo_reproduce_lm/protocol/long/attention/seed2021"
DEFAULT_REPORT = grids.REPO_ROOT / "experiments" / "results" / "long_context.md"
SPARSE_BLOCK = 64
# The xla path holds [batch, heads, query blocks, block, listed keys] scores: batches of about
# 16k characters (8 windows of 2,048).
EVAL_CHARACTERS = 16384


@dataclasses.dataclass(frozen=True)
class Method:
  name: str             # "dense" or a SPARSE_PREFILL method
  setting: float = 0.0  # XAttention's threshold; MInference's vertical and slash line counts

  @property
  def label(self) -> str:
    if self.name == "xattention":
      return f"xattention (threshold {self.setting:g})"
    if self.name == "minference":
      return f"minference ({self.setting:g} vertical + {self.setting:g} slash)"
    return self.name

  def model_overrides(self) -> dict[str, Any]:
    if self.name == "dense":
      return {"sparse_prefill": "none"}
    overrides = {"sparse_prefill": self.name, "sparse_block": SPARSE_BLOCK}
    if self.name == "xattention":
      return dict(overrides, sparse_threshold=self.setting)
    return dict(overrides, sparse_vertical=int(self.setting), sparse_slash=int(self.setting))


def _load(workdir: str, method: Method):
  config = workdir_lib.read_config(workdir)
  config.model.update(method.model_overrides())
  config.train.eval_batch_size = max(1, EVAL_CHARACTERS // int(config.data.seq_len))
  return workdir_lib.load_best_model(workdir, config=config)


def _predict_fn(model: nnx.Module) -> Callable[[Any], jax.Array]:
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  return lambda tokens: predict(state, jnp.asarray(tokens))


def _density(model: nnx.Module, task: Any, windows: int) -> float:
  """Mean kept fraction of the visible key blocks over layers, heads and windows (each
  attention layer sows it, `paperzoo.layers.causal_mixers`); 1.0 for dense attention."""
  val = task.splits["val"]
  inputs = val.get_batch(np.arange(min(windows, len(val))))["inputs"]
  forward = nnx.capture(model, nnx.Intermediate)
  values = []
  for row in inputs:
    _, sown = forward(jnp.asarray(row[None]))
    values += [float(v) for v in jax.tree.leaves(sown)]
  return float(np.mean(values)) if values else 1.0


class _FirstWindows:
  """The first `count` examples of a split."""

  def __init__(self, split: Any, count: int):
    self.split, self.count = split, min(count, len(split))

  def __len__(self) -> int:
    return self.count

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.split.get_batch(indices)


def evaluate_method(workdir: str, method: Method, *, density_windows: int,
                    val_windows: int = 0) -> dict[str, Any]:
  """Density, validation bits per character (over the first `val_windows` validation windows;
  0: all) and passkey accuracy by depth of one method."""
  model, task = _load(workdir, method)
  predict = _predict_fn(model)
  val = task.splits["val"]
  scores = task.token_scores(predict, _FirstWindows(val, val_windows) if val_windows else val)
  nll = float(np.sum(scores["nll"] * scores["weights"]) / np.sum(scores["weights"]))
  row = {"method": method.label, "name": method.name, "setting": method.setting,
         "val_loss": nll, "val_bits_per_char": nll / math.log(2),
         "density": _density(model, task, density_windows)}
  if task.data.passkey_probe is not None:
    accuracy, counts, overall = task.passkey_by_depth(predict, task.data.passkey_probe)
    row.update(passkey_accuracy=overall, passkey_by_depth=[float(a) for a in accuracy],
               passkey_counts=[int(c) for c in counts])
  return row


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def attention_inputs(model: nnx.Module, tokens: np.ndarray) -> tuple[jax.Array, ...]:
  """q, k, v of the first attention layer for `tokens` [1, T] (rotated as the model does)."""
  x = model._embed(jnp.asarray(tokens))  # pylint: disable=protected-access
  block = model.blocks[0]
  return block.mixer._qkv(block.mixer_norm(x), jnp.arange(tokens.shape[1]))  # pylint: disable=protected-access


def speed_rows(workdir: str, methods: Sequence[Method], lengths: Sequence[int], *,
               repeats: int) -> list[dict[str, Any]]:
  """Prefill attention time of one layer, dense against selector + block-sparse."""
  model, task = _load(workdir, Method("dense"))
  val = task.splits["val"]
  text = val.get_batch(np.arange(len(val)))["inputs"].reshape(-1)  # the windows in order
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  rows = []
  for length in lengths:
    if length > text.size:
      raise config_lib.ConfigError(f"--speed_lengths={length} is longer than the validation "
                                   f"text ({text.size} characters)")
    q, k, v = attention_inputs(model, text[None, :length])
    dense_seconds = _best_seconds(lambda: dense(q, k, v), repeats)
    rows.append({"length": length, "method": "dense", "seconds": dense_seconds,
                 "density": 1.0})
    for method in methods:
      if method.name == "dense":
        continue
      config = config_lib.ConfigDict(method.model_overrides())
      selector = jax.jit(make_block_selector(config))
      blocks = selector(q, k).trimmed()
      sparse = jax.jit(lambda q, k, v, blocks=blocks: block_sparse_attention(
          q, k, v, blocks, causal=True, impl="xla"))
      select_seconds = _best_seconds(lambda: selector(q, k), repeats)
      sparse_seconds = _best_seconds(lambda: sparse(q, k, v), repeats)
      visible = (causal_block_mask(length, length, SPARSE_BLOCK, SPARSE_BLOCK).sum()
                 * blocks.counts.shape[1])
      rows.append({"length": length, "method": method.label,
                   "seconds": select_seconds + sparse_seconds,
                   "select_seconds": select_seconds, "sparse_seconds": sparse_seconds,
                   "density": float(np.sum(blocks.counts)) / visible,
                   "speedup": dense_seconds / (select_seconds + sparse_seconds)})
  return rows


def write_report(path: pathlib.Path, quality: list[dict[str, Any]], speed: list[dict[str, Any]],
                 *, workdir: str, command: str, val_windows: int = 0) -> None:
  dense = next((r for r in quality if r["name"] == "dense"), None)
  date = datetime.date.today().isoformat()
  lines = [
      "# Block-sparse prefill on the long-context character model",
      "",
      f"Written by `{command}` on {date}: {platform.processor() or platform.machine()}, "
      f"{jax.devices()[0].platform} ({len(jax.devices())} device), Python "
      f"{platform.python_version()}, jax {jax.__version__}. Model: `{workdir}` (the "
      "language-model grid's `long/attention` run, context 2,048). Every attention layer's "
      f"prefill keeps the key blocks (of {SPARSE_BLOCK}) its selector chooses; see "
      "`experiments/long_context.py` for what each column measures.",
      "",
      "## Quality (context 2,048, "
      + (f"the first {val_windows} validation windows only, not the protocol)" if val_windows
         else "the whole validation split)"),
      "",
      "| method | density (kept / visible blocks) | val bits/char | change | passkey accuracy "
      "(%) | by depth (%) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for row in quality:
    change = "" if dense is None or row is dense else (
        f"{round(row['val_bits_per_char'] - dense['val_bits_per_char'], 4) + 0.0:+.4f}")
    depth = " / ".join(f"{100 * a:.0f}" for a in row.get("passkey_by_depth", []))
    passkey = (f"{100 * row['passkey_accuracy']:.1f}" if "passkey_accuracy" in row else "")
    lines.append(f"| {row['method']} | {100 * row['density']:.1f}% | "
                 f"{row['val_bits_per_char']:.4f} | {change} | {passkey} | {depth} |")
  lines += ["", "## Prefill attention time (one layer, batch 1, real queries and keys)", "",
            "| context | method | density (layer 0) | selector (ms) | attention (ms) | total (ms) | "
            "dense / total |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for row in speed:
    if row["method"] == "dense":
      lines.append(f"| {row['length']:,} | dense (XLA) | 100% | | "
                   f"{1e3 * row['seconds']:.1f} | {1e3 * row['seconds']:.1f} | 1.00 |")
    else:
      lines.append(f"| {row['length']:,} | {row['method']} | {100 * row['density']:.1f}% | "
                   f"{1e3 * row['select_seconds']:.1f} | {1e3 * row['sparse_seconds']:.1f} | "
                   f"{1e3 * row['seconds']:.1f} | {row['speedup']:.2f} |")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")
  # The rows themselves, so that the tables can be redrawn without recomputing them.
  path.with_suffix(".json").write_text(json.dumps(
      {"command": command, "workdir": workdir, "date": date, "quality": quality,
       "speed": speed}, indent=1) + "\n")


_WORKDIR = flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "The finished long-context run.")
_METHODS = flags.DEFINE_list("methods", ["xattention", "minference"],
                             f"Selectors, of {', '.join(SPARSE_PREFILL[1:])}.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.5", "0.7", "0.9", "0.95"],
                                "XAttention's cumulative-mass thresholds.")
_LINES = flags.DEFINE_list("lines", ["64", "256"],
                           "MInference's vertical and slash line counts (each both).")
_SPEED_LENGTHS = flags.DEFINE_list("speed_lengths", ["2048", "8192"],
                                   "Contexts of the timing rows.")
_DENSITY_WINDOWS = flags.DEFINE_integer("density_windows", 8,
                                        "Validation windows the density is averaged over.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per timing (the best is kept).")
_VAL_WINDOWS = flags.DEFINE_integer("val_windows", 0, "Score only the first windows of the "
                                    "validation split (0: all of it, the protocol).")
_REPORT = flags.DEFINE_string("report", str(DEFAULT_REPORT), "Markdown report.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise config_lib.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  unknown = sorted(set(_METHODS.value) - set(SPARSE_PREFILL[1:]))
  if unknown:
    raise config_lib.ConfigError(f"--methods: unknown {unknown}; valid: "
                                 f"{', '.join(SPARSE_PREFILL[1:])}")
  thresholds = [float(t) for t in _THRESHOLDS.value]
  if any(not 0.0 <= t <= 1.0 for t in thresholds):
    raise config_lib.ConfigError(f"--thresholds={thresholds}: each must be in [0, 1]")
  workdir = _WORKDIR.value
  if not workdir_lib.is_done(workdir):
    raise workdir_lib.MissingRunError(
        f"{workdir} holds no finished run; train it with `python -m experiments.reproduce lm "
        f"--entries=long --seeds=1` (or pass --workdir)")
  lines = [int(n) for n in _LINES.value]
  if any(n < 1 for n in lines):
    raise config_lib.ConfigError(f"--lines={lines}: each must be >= 1")
  settings = {"xattention": thresholds, "minference": lines}
  methods = [Method("dense")] + [Method(m, x) for m in _METHODS.value for x in settings[m]]
  quality = []
  for method in methods:
    row = evaluate_method(workdir, method, density_windows=_DENSITY_WINDOWS.value,
                          val_windows=_VAL_WINDOWS.value)
    print(f"{row['method']}: density {100 * row['density']:.1f}%, val bits/char "
          f"{row['val_bits_per_char']:.4f}, passkey {row.get('passkey_accuracy', math.nan):.3f}",
          flush=True)
    quality.append(row)
  speed = speed_rows(workdir, methods, [int(n) for n in _SPEED_LENGTHS.value],
                     repeats=_REPEATS.value)
  for row in speed:
    print(f"context {row['length']}: {row['method']}: {1e3 * row['seconds']:.1f} ms"
          + (f" ({row['speedup']:.2f}x dense)" if "speedup" in row else ""), flush=True)
  command = "python -m experiments.long_context " + " ".join(sys.argv[1:])
  write_report(pathlib.Path(_REPORT.value), quality, speed, workdir=workdir,
               command=command.strip(), val_windows=_VAL_WINDOWS.value)
  print(f"report: {_REPORT.value}")


if __name__ == "__main__":
  cli.run(main)
