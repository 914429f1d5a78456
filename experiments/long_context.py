r"""Long-context inference on the character model: block-sparse prefill and KV-cache compression,
side by side, from one resumable command.

  python -m experiments.long_context \
      [--workdir=/tmp/paperzoo_reproduce_lm/protocol/long/attention/seed2021] \
      [--methods=xattention,minference,minference_heads,flexprefill,sale] \
      [--thresholds=0.5,0.7,0.9] [--lines=64,256] [--head_budgets=0.3,0.6] \
      [--gammas=0.5,0.7,0.9,0.95] [--sale_thresholds=0.01,0.1,0.2,0.5] \
      [--budgets=64,128,256,512,1024] [--speed_lengths=2048,8192] \
      [--report=experiments/results/long_context.md]

The model is the language-model grid's `long/attention` run (4 layers, width 128, 4 heads of 32,
rotary positions, context 2,048, passkeys in a quarter of its training windows; train it with
`python -m experiments.reproduce lm --entries=long --seeds=1`). Its best checkpoint is restored
with the method's keys of `config.model` set (`paperzoo.sparse_attention`).

Block-sparse prefill: every attention layer's parallel pass outside training runs block-sparse
attention over the key blocks (of 64) its selector keeps. The methods and their settings:
  xattention        XAttention, at each cumulative-mass `--thresholds`;
  minference        MInference's vertical-slash pattern on every head, `--lines` vertical and
                    slash lines each, estimated from the last 64 queries;
  minference_heads  MInference with each head's pattern (A-shape, vertical-slash or
                    block-sparse) chosen offline on one training window (the calibration
                    sample, never scored) under each `--head_budgets` (the kept fraction of the
                    visible blocks a head may use there), indices estimated online;
  flexprefill       FlexPrefill at each cumulative-mass `--gammas` (tau 0.1, a minimum budget
                    of 256 tokens: the paper's 512 scaled to this model's context);
  sale              SALE (4-bit estimate, relative attention score) at each `--sale_thresholds`.
Each is scored, with dense attention, on
  * density: the kept fraction of the causally visible key blocks, averaged over layers, heads
    and the first `--density_windows` validation windows;
  * validation bits per character over the whole validation split (windows of 2,048; the
    first `--val_windows` with that flag, and the report says so), and the change from dense;
  * passkey accuracy by depth on the run's passkey probe (250 held-out windows);
  * prefill attention time at each of `--speed_lengths` (one layer's attention on the first
    layer's real queries and keys of validation text, batch 1): dense causal attention
    (`jax.nn.dot_product_attention`, XLA) against the selector plus block-sparse attention
    (the `xla` path), each the best of `--repeats` timed calls after compilation, in one run;
    and the selector's time as a share of the sparse attention it feeds.

KV-cache compression (SnapKV): the prompt runs densely, then each layer keeps `--budgets`
positions per head (the last 32 prompt queries vote, pooled over 7 positions) and decoding runs
on the compressed cache:
  * validation bits per character of the last `--snapkv_tail` characters of every validation
    window, decoded one step at a time after a prompt of the rest, against the full cache on
    the same characters; passkey accuracy by depth, the prompt ending before the answer;
  * decode time per token and cache memory after prompts of each `--speed_lengths`, against the
    full cache, decoded by single-pass attention and by the split-K decode kernel
    (LeanAttention, `model.decode_attention_impl`).

Resumable: every finished row is kept in the ledger beside the report
(`<report stem>_runs.jsonl`, `experiments.run_ledger`), keyed by section and method, with the
model's config digest, so a rerun computes only what is missing (`--fresh` recomputes). The
report (`--report`) and its plots are rewritten at the end, with the machine, versions, date
and command.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
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
from experiments import run_ledger
from paperzoo import config as config_lib
from paperzoo import plots
from paperzoo import workdir as workdir_lib
from paperzoo.generation import decoding
from paperzoo.layers.causal_mixers import DECODE_ATTENTION_IMPLS
from paperzoo.sparse_attention import causal_block_mask, make_block_selector
from paperzoo.sparse_attention.minference import (calibrate_head_patterns,
                                                  minference_blocks)
from pallas_kernels.block_sparse_attention import block_sparse_attention

DEFAULT_WORKDIR = "/tmp/paperzoo_reproduce_lm/protocol/long/attention/seed2021"
DEFAULT_REPORT = grids.REPO_ROOT / "experiments" / "results" / "long_context.md"
SPARSE_BLOCK = 64
# Validation batches of about 16k characters (8 windows of 2,048).
EVAL_CHARACTERS = 16384
# FlexPrefill's minimum budget: the paper's 512 tokens at 8K-128K contexts, scaled to 2,048.
FLEXPREFILL_MIN_BUDGET = 256
FLEXPREFILL_TAU = 0.1
BLOCK_METHODS = ("xattention", "minference", "minference_heads", "flexprefill", "sale")


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """One prefill setting: `name` ("dense" or one of BLOCK_METHODS) and its `setting` (the
  threshold, line count, head budget or gamma)."""
  name: str
  setting: float = 0.0

  @property
  def label(self) -> str:
    return {
        "dense": "dense",
        "xattention": f"xattention (threshold {self.setting:g})",
        "minference": f"minference ({self.setting:g} vertical + {self.setting:g} slash)",
        "minference_heads": f"minference per-head patterns (budget {self.setting:g})",
        "flexprefill": f"flexprefill (gamma {self.setting:g})",
        "sale": f"sale (threshold {self.setting:g})",
    }[self.name]

  def model_overrides(self) -> dict[str, Any]:
    """The keys of `config.model` that select this method (per-head MInference patterns are
    set per layer after calibration, `calibrate`)."""
    if self.name in ("dense", "minference_heads"):
      return {"sparse_prefill": "none"}
    overrides = {"sparse_prefill": self.name, "sparse_block": SPARSE_BLOCK}
    if self.name == "xattention":
      return dict(overrides, sparse_threshold=self.setting)
    if self.name == "minference":
      return dict(overrides, sparse_vertical=int(self.setting), sparse_slash=int(self.setting))
    if self.name == "flexprefill":
      return dict(overrides, sparse_gamma=self.setting, sparse_tau=FLEXPREFILL_TAU,
                  sparse_min_budget=FLEXPREFILL_MIN_BUDGET)
    return dict(overrides, sparse_sale_threshold=self.setting)


def _load(workdir: str, overrides: dict[str, Any]):
  config = workdir_lib.read_config(workdir)
  config.model.update(overrides)
  config.train.eval_batch_size = max(1, EVAL_CHARACTERS // int(config.data.seq_len))
  return workdir_lib.load_best_model(workdir, config=config)


def layer_attention_inputs(model: nnx.Module, tokens: Any) -> list[tuple[jax.Array, ...]]:
  """Each attention layer's (q, k, v) for `tokens` [B, T], rotated as the model does."""
  x = model._embed(jnp.asarray(tokens))  # pylint: disable=protected-access
  positions = jnp.arange(x.shape[1])
  inputs = []
  for block in model.blocks:
    inputs.append(block.mixer._qkv(block.mixer_norm(x), positions))  # pylint: disable=protected-access
    x = block(x, train=False, rngs=None)
  return inputs


def calibrate(model: nnx.Module, task: Any, budget: float) -> list[Any]:
  """MInference's offline search on one training window: each layer's per-head patterns, set
  as that layer's block selector; returns the patterns, layer by layer."""
  sample = task.splits["train"].get_batch(np.arange(1))["inputs"]
  chosen = []
  for block, (q, k, _) in zip(model.blocks, layer_attention_inputs(model, sample)):
    patterns = calibrate_head_patterns(q, k, budget=budget, block=SPARSE_BLOCK)
    block.mixer.block_selector = functools.partial(
        minference_blocks, patterns=patterns, block=SPARSE_BLOCK)
    chosen.append(patterns)
  return chosen


def load_method(workdir: str, method: Method):
  model, task = _load(workdir, method.model_overrides())
  patterns = calibrate(model, task, method.setting) if method.name == "minference_heads" else []
  return model, task, patterns


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


class _Tail:
  """A split whose examples are scored only on their last `tail` positions."""

  def __init__(self, split: Any, tail: int):
    self.split, self.tail = split, tail

  def __len__(self) -> int:
    return len(self.split)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = dict(self.split.get_batch(indices))
    weights = np.array(batch["weights"], np.float32)
    weights[:, :-self.tail] = 0.0
    batch["weights"] = weights
    return batch


def _bits_per_char(scores: dict[str, np.ndarray]) -> float:
  return float(np.sum(scores["nll"] * scores["weights"]) / np.sum(scores["weights"])
               / math.log(2))


def _passkey(task: Any, predict: Callable[..., Any]) -> dict[str, Any]:
  if task.data.passkey_probe is None:
    return {}
  accuracy, counts, overall = task.passkey_by_depth(predict, task.data.passkey_probe)
  return {"passkey_accuracy": overall, "passkey_by_depth": [float(a) for a in accuracy],
          "passkey_counts": [int(c) for c in counts]}


def evaluate_method(workdir: str, method: Method, *, density_windows: int,
                    val_windows: int = 0) -> dict[str, Any]:
  """Density, validation bits per character (over the first `val_windows` validation windows;
  0: all) and passkey accuracy by depth of one prefill method."""
  model, task, patterns = load_method(workdir, method)
  predict = _predict_fn(model)
  val = task.splits["val"]
  scores = task.token_scores(predict, _FirstWindows(val, val_windows) if val_windows else val)
  row = {"method": method.label, "name": method.name, "setting": method.setting,
         "val_bits_per_char": _bits_per_char(scores),
         "density": _density(model, task, density_windows), **_passkey(task, predict)}
  if patterns:
    row["patterns"] = [[f"{p.name} {'/'.join(map(str, p.sizes))}" for p in layer]
                       for layer in patterns]
  return row


# --------------------------------------------------------------------------------------------
# Prefill time
# --------------------------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _validation_text(task: Any, length: int) -> np.ndarray:
  val = task.splits["val"]
  text = val.get_batch(np.arange(len(val)))["inputs"].reshape(-1)  # the windows in order
  if length > text.size:
    raise config_lib.ConfigError(f"--speed_lengths={length} is longer than the validation "
                                 f"text ({text.size} characters)")
  return text[:length]


def speed_rows(workdir: str, method: Method, length: int, *, repeats: int
               ) -> dict[str, Any]:
  """Prefill attention time of the first layer at `length`: dense (`method` "dense") or the
  selector plus block-sparse attention."""
  model, task, patterns = load_method(workdir, method)
  q, k, v = layer_attention_inputs(model, _validation_text(task, length)[None])[0]
  if method.name == "dense":
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    return {"length": length, "method": "dense", "seconds": _best_seconds(
        lambda: dense(q, k, v), repeats), "density": 1.0}
  if patterns:
    selector = jax.jit(model.blocks[0].mixer.block_selector)
  else:
    selector = jax.jit(make_block_selector(config_lib.ConfigDict(method.model_overrides())))
  blocks = selector(q, k)
  sparse = jax.jit(lambda q, k, v, blocks: block_sparse_attention(
      q, k, v, blocks, causal=True, impl="xla"))
  select_seconds = _best_seconds(lambda: selector(q, k), repeats)
  sparse_seconds = _best_seconds(lambda: sparse(q, k, v, blocks), repeats)
  visible = causal_block_mask(length, length, SPARSE_BLOCK, SPARSE_BLOCK).sum()
  return {"length": length, "method": method.label,
          "seconds": select_seconds + sparse_seconds, "select_seconds": select_seconds,
          "sparse_seconds": sparse_seconds,
          "density": float(np.sum(blocks.counts)) / (visible * blocks.counts.shape[1])}


# --------------------------------------------------------------------------------------------
# KV-cache compression
# --------------------------------------------------------------------------------------------


def snapkv_quality(workdir: str, budget: int, *, tail: int, val_windows: int = 0
                   ) -> dict[str, Any]:
  """Bits per character of the last `tail` characters of each validation window, decoded step
  by step after a SnapKV-compressed prompt of the rest (budget 0: the full cache), and passkey
  accuracy with the prompt ending before the answer line."""
  model, task = _load(workdir, {"kv_budget": budget})
  val = task.splits["val"]
  seq_len = int(task.data.seq_len)

  def through_cache(prefill_length: int) -> Callable[[Any], jax.Array]:
    return lambda tokens: decoding.decode_logits(model, tokens, prefill_length=prefill_length)

  windows = _FirstWindows(val, val_windows) if val_windows else val
  scores = task.token_scores(through_cache(seq_len - tail), _Tail(windows, tail))
  row = {"budget": budget, "val_bits_per_char": _bits_per_char(scores)}
  probe = task.data.passkey_probe
  if probe is not None:
    # The prompt ends where the answer starts: the key is decoded from the compressed cache.
    answer_start = int(np.argmax(probe.get_batch(np.arange(1))["weights"][0] > 0))
    row.update(_passkey(task, through_cache(answer_start)))
  return row


def decode_rows(workdir: str, budget: int, impl: str, length: int, *, new_tokens: int
                ) -> dict[str, Any]:
  """Decode time per token after a prompt of `length` validation characters, and the cache's
  bytes, with `budget` (0: full cache) and the attention `impl` of the cached steps."""
  model, task = _load(workdir, {"kv_budget": budget, "decode_attention_impl": impl})
  prompt = _validation_text(task, length)[None]
  _, stats = decoding.generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0,
                               return_stats=True)
  cache_bytes = sum(block.mixer.cache_bytes(1, length + new_tokens, length)
                    for block in model.blocks)
  return {"length": length, "budget": budget, "impl": impl,
          "seconds_per_token": stats.decode_seconds / stats.new_tokens,
          "cache_bytes": int(cache_bytes)}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _change(row: dict[str, Any], base: dict[str, Any] | None) -> str:
  if base is None or row is base:
    return ""
  return f"{round(row['val_bits_per_char'] - base['val_bits_per_char'], 4) + 0.0:+.4f}"


def _passkey_cells(row: dict[str, Any]) -> str:
  passkey = f"{100 * row['passkey_accuracy']:.1f}" if "passkey_accuracy" in row else ""
  depth = " / ".join(f"{100 * a:.0f}" for a in row.get("passkey_by_depth", []))
  return f"{passkey} | {depth}"


def plot_quality(quality: list[dict[str, Any]], snapkv: list[dict[str, Any]],
                 path: pathlib.Path) -> pathlib.Path:
  """Left: bits/char change against density, one line per prefill method; right: SnapKV's
  bits/char change against the cache budget."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (plots set Agg)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  dense = next((r for r in quality if r["name"] == "dense"), None)
  for name in BLOCK_METHODS:
    rows = sorted((r for r in quality if r["name"] == name), key=lambda r: r["density"])
    if rows and dense is not None:
      left.plot([100 * r["density"] for r in rows],
                [r["val_bits_per_char"] - dense["val_bits_per_char"] for r in rows],
                marker="o", label=name)
  left.legend()
  full = next((r for r in snapkv if r["budget"] == 0), None)
  compressed = sorted((r for r in snapkv if r["budget"]), key=lambda r: r["budget"])
  if full is not None and compressed:
    right.plot([r["budget"] for r in compressed],
               [r["val_bits_per_char"] - full["val_bits_per_char"] for r in compressed],
               marker="o", color="tab:purple")
    right.set_xscale("log", base=2)
  for ax, (xlabel, ylabel, title) in (
      (left, ("density (% of the visible key blocks kept)", "validation bits/char - dense",
              "block-sparse prefill")),
      (right, ("SnapKV cache budget (prompt positions kept per head)",
               "bits/char of the decoded tail - full cache", "KV-cache compression"))):
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.axhline(0.0, color="tab:gray", linewidth=0.8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return plots.save_figure(fig, path)


def write_report(path: pathlib.Path, sections: dict[str, list[dict[str, Any]]], *,
                 workdir: str, command: str, val_windows: int, tail: int) -> None:
  quality, speed = sections["quality"], sections["speed"]
  snapkv, decode = sections["snapkv"], sections["decode"]
  dense = next((r for r in quality if r["name"] == "dense"), None)
  date = datetime.date.today().isoformat()
  picture = path.with_suffix("") / "quality.png"
  plot_quality(quality, snapkv, picture)
  scope = (f"the first {val_windows} validation windows only, not the protocol" if val_windows
           else "the whole validation split")
  lines = [
      "# Long-context inference on the character model: sparse prefill and KV-cache compression",
      "",
      f"Written by `{command}` on {date}: {platform.processor() or platform.machine()}, "
      f"{jax.devices()[0].platform} ({len(jax.devices())} device), Python "
      f"{platform.python_version()}, jax {jax.__version__}. Model: `{workdir}` (the "
      "language-model grid's `long/attention` run, context 2,048). Rows come from the ledger "
      f"`{run_ledger.ledger_path(path).name}` (each with its commit and date); "
      "`experiments/long_context.py` says what each column measures.",
      "",
      f"![quality]({picture.relative_to(path.parent)})",
      "",
      f"## Block-sparse prefill: quality (context 2,048, {scope})",
      "",
      "Every attention layer's prefill keeps the key blocks (of "
      f"{SPARSE_BLOCK}) its selector chooses.",
      "",
      "| method | density (kept / visible blocks) | val bits/char | change | passkey accuracy "
      "(%) | by depth (%) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for row in quality:
    lines.append(f"| {row['method']} | {100 * row['density']:.1f}% | "
                 f"{row['val_bits_per_char']:.4f} | {_change(row, dense)} | "
                 f"{_passkey_cells(row)} |")
  calibrated = [r for r in quality if r.get("patterns")]
  for row in calibrated:
    counts: dict[str, int] = {}
    for layer in row["patterns"]:
      for pattern in layer:
        kind = pattern.split()[0]
        counts[kind] = counts.get(kind, 0) + 1
    lines += ["", f"{row['method']}: heads per pattern (of {sum(counts.values())}): "
              + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
              + "; layer by layer: "
              + "; ".join(", ".join(layer) for layer in row["patterns"]) + "."]
  lines += ["", "## Block-sparse prefill: attention time (one layer, batch 1, real queries and "
            "keys, the `xla` path)", "",
            "| context | method | density (layer 0) | selector (ms) | attention (ms) | "
            "selector / attention | total (ms) | dense / total |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for group in speed:
    dense_row = next(r for r in group["rows"] if r["method"] == "dense")
    for row in group["rows"]:
      if row is dense_row:
        lines.append(f"| {row['length']:,} | dense (XLA) | 100% | | {1e3 * row['seconds']:.1f} "
                     f"| | {1e3 * row['seconds']:.1f} | 1.00 |")
        continue
      lines.append(
          f"| {row['length']:,} | {row['method']} | {100 * row['density']:.1f}% | "
          f"{1e3 * row['select_seconds']:.1f} | {1e3 * row['sparse_seconds']:.1f} | "
          f"{100 * row['select_seconds'] / row['sparse_seconds']:.0f}% | "
          f"{1e3 * row['seconds']:.1f} | {dense_row['seconds'] / row['seconds']:.2f} |")
  full = next((r for r in snapkv if r["budget"] == 0), None)
  lines += ["", f"## KV-cache compression (SnapKV): quality (the last {tail} characters of "
            f"each validation window, {scope})", "",
            "| cache | val bits/char (decoded tail) | change | passkey accuracy (%) | "
            "by depth (%) |", "| --- | --- | --- | --- | --- |"]
  for row in snapkv:
    name = f"{row['budget']} positions per head" if row["budget"] else "full"
    lines.append(f"| {name} | {row['val_bits_per_char']:.4f} | {_change(row, full)} | "
                 f"{_passkey_cells(row)} |")
  lines += ["", "## KV-cache compression: decode time and cache memory (batch 1, greedy, all "
            "layers)", "",
            "| prompt | cache | decode attention | ms per token | full cache / this | "
            "cache memory (KiB) |", "| --- | --- | --- | --- | --- | --- |"]
  for group in decode:
    base = group["rows"][0]  # the full cache, the first decode attention
    for row in group["rows"]:
      name = f"{row['budget']} per head" if row["budget"] else "full"
      lines.append(f"| {row['length']:,} | {name} | {row['impl']} | "
                   f"{1e3 * row['seconds_per_token']:.2f} | "
                   f"{base['seconds_per_token'] / row['seconds_per_token']:.2f} | "
                   f"{row['cache_bytes'] / 1024:,.0f} |")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


_WORKDIR = flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "The finished long-context run.")
_METHODS = flags.DEFINE_list("methods", list(BLOCK_METHODS),
                             f"Prefill methods, of {', '.join(BLOCK_METHODS)}.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.5", "0.7", "0.9"],
                                "XAttention's cumulative-mass thresholds.")
_LINES = flags.DEFINE_list("lines", ["64", "256"],
                           "MInference's vertical and slash line counts (each both).")
_HEAD_BUDGETS = flags.DEFINE_list("head_budgets", ["0.3", "0.6"],
                                  "MInference's per-head search: the kept fraction a head may "
                                  "use on the calibration sample.")
_GAMMAS = flags.DEFINE_list("gammas", ["0.5", "0.7", "0.9", "0.95"],
                            "FlexPrefill's cumulative-mass gammas.")
_SALE_THRESHOLDS = flags.DEFINE_list("sale_thresholds", ["0.01", "0.1", "0.2", "0.5"],
                                     "SALE's relative-attention-score thresholds.")
_BUDGETS = flags.DEFINE_list("budgets", ["64", "128", "256", "512", "1024"],
                             "SnapKV cache budgets (prompt positions per head); [] skips.")
_SNAPKV_TAIL = flags.DEFINE_integer("snapkv_tail", 256, "Decoded characters per validation "
                                    "window scored with a compressed cache.")
_DECODE_IMPLS = flags.DEFINE_list("decode_impls", ["dense", "lean"],
                                  "Decode attention of the timed steps "
                                  "(model.decode_attention_impl).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Decoded tokens per decode timing.")
_SPEED_LENGTHS = flags.DEFINE_list("speed_lengths", ["2048", "8192"],
                                   "Contexts of the timing rows.")
_DENSITY_WINDOWS = flags.DEFINE_integer("density_windows", 8,
                                        "Validation windows the density is averaged over.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per timing (the best is kept).")
_VAL_WINDOWS = flags.DEFINE_integer("val_windows", 0, "Score only the first windows of the "
                                    "validation split (0: all of it, the protocol).")
_FRESH = flags.DEFINE_boolean("fresh", False, "Recompute rows the ledger already holds.")
_REPORT = flags.DEFINE_string("report", str(DEFAULT_REPORT), "Markdown report.")


def _floats(name: str, values: Sequence[str], low: float, high: float) -> list[float]:
  numbers = [float(x) for x in values]
  if any(not low <= x <= high for x in numbers):
    raise config_lib.ConfigError(f"--{name}={numbers}: each must be in [{low:g}, {high:g}]")
  return numbers


def _ints(name: str, values: Sequence[str], low: int) -> list[int]:
  numbers = [int(x) for x in values]
  if any(x < low for x in numbers):
    raise config_lib.ConfigError(f"--{name}={numbers}: each must be >= {low}")
  return numbers


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise config_lib.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  unknown = sorted(set(_METHODS.value) - set(BLOCK_METHODS))
  if unknown:
    raise config_lib.ConfigError(f"--methods: unknown {unknown}; valid: "
                                 f"{', '.join(BLOCK_METHODS)}")
  unknown = sorted(set(_DECODE_IMPLS.value) - set(DECODE_ATTENTION_IMPLS))
  if unknown or not _DECODE_IMPLS.value:
    raise config_lib.ConfigError(f"--decode_impls: unknown {unknown}; valid: "
                                 f"{', '.join(DECODE_ATTENTION_IMPLS)}")
  settings = {
      "xattention": _floats("thresholds", _THRESHOLDS.value, 0.0, 1.0),
      "minference": _ints("lines", _LINES.value, 1),
      "minference_heads": _floats("head_budgets", _HEAD_BUDGETS.value, 1e-9, 1.0),
      "flexprefill": _floats("gammas", _GAMMAS.value, 0.0, 1.0),
      "sale": _floats("sale_thresholds", _SALE_THRESHOLDS.value, 0.0, math.inf),
  }
  budgets = _ints("budgets", _BUDGETS.value, 1)
  lengths = _ints("speed_lengths", _SPEED_LENGTHS.value, SPARSE_BLOCK)
  workdir = _WORKDIR.value
  if not workdir_lib.is_done(workdir):
    raise workdir_lib.MissingRunError(
        f"{workdir} holds no finished run; train it with `python -m experiments.reproduce lm "
        f"--entries=long --seeds=1` (or pass --workdir)")
  methods = [Method("dense")] + [Method(m, x) for m in _METHODS.value for x in settings[m]]
  val_windows, tail = _VAL_WINDOWS.value, _SNAPKV_TAIL.value
  report = pathlib.Path(_REPORT.value)
  command = ("python -m experiments.long_context " + " ".join(sys.argv[1:])).strip()
  digest = run_ledger.config_digest(json.loads((pathlib.Path(workdir) / "config.json")
                                               .read_text()))
  scope = f"/val{val_windows}" if val_windows else ""

  def cached(key: str, compute: Callable[[], Any]) -> Any:
    """The ledger's row for `key` when it was computed for this model, else computed now
    and recorded at once (a later failure or kill costs nothing finished)."""
    with run_ledger.report_lock(report):
      record = run_ledger.Ledger(run_ledger.ledger_path(report)).get(key)
    if record is not None and record.config_digest == digest and not _FRESH.value:
      return record.results["row"]
    row = compute()
    with run_ledger.report_lock(report):
      run_ledger.Ledger(run_ledger.ledger_path(report)).put([run_ledger.Record(
          key, {"row": row}, digest, time.time(), run_ledger.current_commit(), command)])
    return row

  sections: dict[str, list[Any]] = {"quality": [], "speed": [], "snapkv": [], "decode": []}
  for method in methods:
    row = cached(f"quality/{method.label}{scope}", lambda method=method: evaluate_method(
        workdir, method, density_windows=_DENSITY_WINDOWS.value, val_windows=val_windows))
    print(f"{row['method']}: density {100 * row['density']:.1f}%, val bits/char "
          f"{row['val_bits_per_char']:.4f}, passkey {row.get('passkey_accuracy', math.nan):.3f}",
          flush=True)
    sections["quality"].append(row)
  # Ratios compare times of one run: a context's timings are one ledger row.
  labels = ",".join(m.label for m in methods)
  for length in lengths:
    group = cached(f"speed/{length}/{labels}", lambda length=length: {"rows": [
        speed_rows(workdir, method, length, repeats=_REPEATS.value) for method in methods]})
    for row in group["rows"]:
      print(f"context {length}: {row['method']}: {1e3 * row['seconds']:.1f} ms", flush=True)
    sections["speed"].append(group)
  for budget in [0] + budgets:
    row = cached(f"snapkv/{budget}/tail{tail}{scope}", lambda budget=budget: snapkv_quality(
        workdir, budget, tail=tail, val_windows=val_windows))
    print(f"snapkv budget {budget or 'full'}: tail bits/char {row['val_bits_per_char']:.4f}",
          flush=True)
    sections["snapkv"].append(row)
  settings_decode = [(0, impl) for impl in _DECODE_IMPLS.value] + [
      (budget, _DECODE_IMPLS.value[0]) for budget in budgets]
  for length in lengths:
    key = f"decode/{length}/{settings_decode}/new{_NEW_TOKENS.value}"
    group = cached(key, lambda length=length: {"rows": [
        decode_rows(workdir, budget, impl, length, new_tokens=_NEW_TOKENS.value)
        for budget, impl in settings_decode]})
    sections["decode"].append(group)
  write_report(report, sections, workdir=workdir, command=command, val_windows=val_windows,
               tail=tail)
  print(f"report: {report}")


if __name__ == "__main__":
  cli.run(main)
