r"""One prepared run on a lent GPU: every `pallas_kernels` kernel checked against its reference
and timed against its baselines, within a time budget, results written as it goes.

  python -m experiments.benchmarks.device_check --out_dir=$OUT      # on the device (8 min)
  python -m experiments.benchmarks.device_check --tiny --results_dir=/tmp/dc  # CPU rehearsal

Sections, in priority order (a section or case that would not fit in what is left of
`--budget_s` is skipped, and the results say so):
  correctness   each implementation against its reference at moderate odd shapes, float32:
                flash_attention, block_sparse_attention (forward and gradients),
                selective_scan, chunked_linear_attention (forward and gradients),
                decode_attention (forward). Per output and gradient the max abs error
                |got - want|, passed when it is at most tol * max(max|want|, 1e-2) (the kernel
                tests' scaling). tol: 1e-4 forward, 1e-3 gradients in interpret mode (float32
                throughout); 5e-3 and 2e-2 compiled for the GPU, where Triton runs float32
                dots on TF32 tensor cores (10-bit mantissa) unless told otherwise.
  block_sparse  causal block-sparse attention (Pallas forward) at 5, 10, 25 and 50% of the
                causal key blocks (random, the diagonal always listed), lengths 4K to 64K,
                against dense causal attention: cuDNN (`jax.nn.dot_product_attention`) and
                our flash kernel.
  flash         flash_attention's Pallas kernel against cuDNN, forward and forward + backward.
  decode        decode_attention (LeanAttention's stream-K split of the context over one
                program per SM) at cache lengths 4K to 128K against single-pass decoding:
                the same kernel with one program per (sequence, kv head), num_splits =
                batch x kv_heads, which is FlashAttention-2's decoding (no split of the
                context, no merge); also against XLA split-K, our flash kernel and cuDNN
                on the one new token.
  scan, linear  selective_scan and chunked_linear_attention against their jnp paths,
                forward and forward + backward.
  dit           one DiT training-step throughput, LiT as the baseline
                (`experiments/benchmarks/dit_throughput.py`).

Timings: `pallas_kernels.bench.time_call`, the median of `iters` calls after a compile-and-
warm-up call; ratio = baseline seconds / these seconds, both measured in this run (> 1: faster
than the baseline). Attention TFLOP/s count 4 B H Sq Skv D, halved when causal (block-sparse:
times the listed fraction of key blocks), forward + backward 3.5x that; decode GB/s count the
key/value cache read once.

Results: `experiments/results/device_kernels.md` (tables) and `.json` (rows), rewritten after
every case with the device, jax version, date and command; `--out_dir` gets copies (on the
device: $OUT, so they come back). `--tiny` runs every section at tiny sizes with the
`interpret` implementations and XLA attention in place of cuDNN (checking the kernels alone,
timing forwards only), to rehearse the script on a CPU; its results say "interpret mode on
CPU, not a device measurement" and go to `--results_dir` / `--out_dir` only, never over the
committed files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import bench
from pallas_kernels import compat
from pallas_kernels.block_sparse_attention import BlockList, block_sparse_attention
from pallas_kernels.chunked_linear_attention import chunked_linear_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.selective_scan import selective_scan

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED_RESULTS_DIR = REPO_ROOT / "experiments" / "results"
RESULTS_NAME = "device_kernels"
COMMAND = "python -m experiments.benchmarks.device_check"
SECTIONS = ("correctness", "block_sparse", "flash", "decode", "scan", "linear", "dit")
TINY_NOTE = "interpret mode on {platform}, not a device measurement"
# Relative to max(max|reference|, 1e-2) (module docstring).
TOLERANCES = {"interpret": {"out": 1e-4, "grad": 1e-3},
              "pallas": {"out": 5e-3, "grad": 2e-2}}
# Seconds kept back from the budget for writing the results.
_RESERVE_S = 5.0
# --tiny compiles with these (as the kernel tests' fast_jit): interpret-mode kernels become
# large HLO loops whose XLA:CPU compile dominates; float32 semantics are unchanged.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and settings of one run (DEVICE_PLAN or TINY_PLAN)."""
  kernel_impl: str       # the Pallas kernels: "pallas" compiled, "interpret" on CPU
  dense_impl: str        # dense attention baseline: "cudnn", or "xla" off GPU
  timing_dtype: str      # cuDNN takes bfloat16 / float16 only
  iters: int
  # Also check the jnp paths (xla, sequential, chunked; decode's one split) against the
  # references, and time forward + backward; --tiny leaves both out to stay quick (the same
  # code runs for the kernel impl and the forward).
  every_impl: bool
  first_case_estimate_s: float  # a section's first case, before anything is measured
  # Correctness (float32): (batch, q_len, kv_len, heads, kv_heads, head_dim, causal).
  flash_cases: tuple
  # (batch, length, heads, kv_heads, head_dim, block, density of causal blocks).
  block_sparse_cases: tuple
  # (batch, length, channels, groups or 0 for [B, L, N], state).
  scan_cases: tuple
  # (batch, length, heads, head_dim, chunk).
  linear_cases: tuple
  # (batch, new_tokens, heads, kv_heads, head_dim, cache_len, kv_lengths).
  decode_cases: tuple
  # Timings.
  block_sparse_lengths: tuple
  block_sparse_heads: int
  block_sparse_dim: int
  block_sparse_block: int
  densities: tuple
  flash_timings: tuple   # (batch, seq, heads, head_dim, causal), priority order
  decode_batch: int
  decode_heads: int
  decode_kv_heads: int
  decode_dim: int
  decode_lengths: tuple
  scan_shape: tuple      # (batch, length, channels, state)
  linear_shape: tuple    # (batch, length, heads, head_dim, chunk)
  dit: dict              # dit_throughput.run_benchmark settings
  dit_estimate_s: float


DEVICE_PLAN = Plan(
    kernel_impl="pallas", dense_impl="cudnn", timing_dtype="bfloat16", iters=5, every_impl=True,
    first_case_estimate_s=30.0,
    flash_cases=((2, 1000, 1000, 6, 2, 72, True), (1, 333, 517, 4, 4, 64, False)),
    block_sparse_cases=((2, 1000, 4, 2, 64, 64, 0.3),),
    scan_cases=((2, 301, 96, 2, 16), (1, 1000, 64, 0, 5)),
    linear_cases=((2, 300, 3, 64, 64),),
    decode_cases=((3, 1, 8, 2, 64, 1000, (1000, 517, 1)), (2, 4, 4, 4, 128, 777, (777, 300))),
    block_sparse_lengths=(4096, 16384, 65536), block_sparse_heads=16, block_sparse_dim=128,
    block_sparse_block=128, densities=(0.05, 0.1, 0.25, 0.5),
    flash_timings=((4, 4096, 16, 128, True), (1, 16384, 16, 128, True),
                   (4, 4096, 16, 128, False), (4, 4096, 32, 64, True)),
    decode_batch=8, decode_heads=32, decode_kv_heads=8, decode_dim=128,
    decode_lengths=(4096, 16384, 65536, 131072),
    scan_shape=(8, 2048, 2048, 16), linear_shape=(4, 4096, 16, 128, 64),
    dit=dict(data="cifar10", size="S", patch=2, batch=256, steps=10, repeats=3, warmup=2),
    dit_estimate_s=180.0)

TINY_PLAN = Plan(
    kernel_impl="interpret", dense_impl="xla", timing_dtype="float32", iters=1, every_impl=False,
    first_case_estimate_s=1.0,
    flash_cases=((1, 37, 37, 2, 1, 16, True),),
    block_sparse_cases=((1, 37, 2, 1, 16, 16, 0.5),),
    scan_cases=((1, 13, 6, 2, 3),),
    linear_cases=((1, 21, 2, 16, 16),),
    decode_cases=((2, 1, 2, 1, 16, 37, (37, 5)),),
    block_sparse_lengths=(48,), block_sparse_heads=2, block_sparse_dim=16,
    block_sparse_block=16, densities=(0.5,),
    flash_timings=((1, 32, 2, 16, True),),
    decode_batch=1, decode_heads=2, decode_kv_heads=1, decode_dim=16, decode_lengths=(40,),
    scan_shape=(1, 16, 8, 4), linear_shape=(1, 32, 2, 16, 16),
    dit=dict(data="mnist", size="tiny", patch=8, batch=8, depth=1, width=16, heads=2, steps=2,
             repeats=1, warmup=1, baseline_mixer=""),
    dit_estimate_s=5.0)


class Stopped(BaseException):
  """SIGTERM arrived (the device command's `timeout`): write what was measured, then stop."""


def _stop(signum, frame):
  del signum, frame
  raise Stopped()


def _error_text(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def _label_attention(batch, q_len, kv_len, heads, kv_heads, dim, causal=False) -> str:
  lengths = f"S{q_len}" if q_len == kv_len else f"Sq{q_len} Skv{kv_len}"
  groups = f"H{heads}" if heads == kv_heads else f"H{heads}/{kv_heads}"
  return f"B{batch} {lengths} {groups} D{dim}{' causal' if causal else ''}"


def _decode_module():
  """pallas_kernels.decode_attention, or None while it is not in the checkout."""
  try:
    return importlib.import_module("pallas_kernels.decode_attention")
  except ModuleNotFoundError as error:
    if error.name != "pallas_kernels.decode_attention":
      raise
    return None


def _section_status(status: dict[str, Any]) -> str:
  """"done", or what kept a section from running whole."""
  parts = []
  if status.get("missing_decode"):
    parts.append("decode_attention not in this checkout")
  if status.get("skipped_cases"):
    parts.append(f"{status['skipped_cases']} case(s) skipped for the budget")
  if status.get("failed_cases"):
    parts.append(f"{status['failed_cases']} case(s) failed")
  return "done" if not parts else "partial: " + "; ".join(parts)


class DeviceCheck:
  """Runs the sections in order under the budget, keeping the results on disk current."""

  def __init__(self, plan: Plan, *, tiny: bool, budget_s: float, command: str,
               result_dirs: Sequence[pathlib.Path], print_fn: Callable[[str], None] = print):
    self.plan, self.tiny, self.budget_s = plan, tiny, budget_s
    self.result_dirs, self.print = list(result_dirs), print_fn
    self.start = time.perf_counter()
    device = jax.devices()[0]
    self.results: dict[str, Any] = {
        "device": device.device_kind, "platform": device.platform,
        "device_count": jax.device_count(), "jax_version": jax.__version__,
        "jaxlib_version": importlib.metadata.version("jaxlib"),
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "tiny": tiny,
        "note": (TINY_NOTE.format(platform=device.platform.upper()) if tiny else
                 "device measurement: Pallas kernels compiled for the device, dense "
                 f"baseline {plan.dense_impl}"),
        "budget_s": budget_s, "elapsed_s": 0.0, "timing_dtype": plan.timing_dtype,
        "iters": plan.iters, "tolerances": TOLERANCES[plan.kernel_impl], "peaks": None,
        "sections": {name: {"status": "not run"} for name in SECTIONS}, "rows": []}
    self._cost = [0.0, 0.0]     # this case so far: compile seconds, timed-run seconds
    self._last: dict[str, tuple[float, float, float]] = {}  # section -> fixed, variable, work

  # ------------------------------------------------------------------ budget, rows, files --

  def left_s(self) -> float:
    return self.budget_s - (time.perf_counter() - self.start) - _RESERVE_S

  def estimate_s(self, section: str, work: float, default: float) -> float:
    """The last case's compile time plus its run time scaled by the work ratio."""
    if section not in self._last:
      return default
    fixed, variable, last_work = self._last[section]
    return fixed + variable * (work / last_work if last_work > 0 else 1.0)

  def add(self, row: dict[str, Any]) -> None:
    self.results["rows"].append(row)

  def save(self) -> None:
    self.results["elapsed_s"] = time.perf_counter() - self.start
    text_json = json.dumps(self.results, indent=1, default=float) + "\n"
    text_md = render_markdown(self.results)
    for directory in self.result_dirs:
      directory.mkdir(parents=True, exist_ok=True)
      for suffix, text in ((".json", text_json), (".md", text_md)):
        tmp = directory / f".{RESULTS_NAME}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / f"{RESULTS_NAME}{suffix}")

  def case(self, section: str, label: str, work: float, run: Callable[[], None],
           default_estimate: float | None = None) -> None:
    """Runs one case unless its estimate exceeds the budget left; a failing case is recorded
    and the run goes on; the results are saved after it either way."""
    status = self.results["sections"][section]
    estimate = self.estimate_s(section, work, default_estimate or
                               self.plan.first_case_estimate_s)
    if estimate > self.left_s():
      reason = (f"skipped: about {estimate:.0f} s estimated, {max(self.left_s(), 0):.0f} s "
                "of the budget left")
      self.add({"section": section, "case": label, "skipped": reason})
      status["skipped_cases"] = status.get("skipped_cases", 0) + 1
      self.print(f"[{section}] {label}: {reason}")
      self.save()
      return
    self._cost = [0.0, 0.0]
    start = time.perf_counter()
    try:
      run()
    except Stopped:
      self.add({"section": section, "case": label, "error": "stopped by SIGTERM"})
      raise
    except Exception as error:  # noqa: BLE001 (one failing case must not end the run)
      self.add({"section": section, "case": label, "error": _error_text(error)})
      status["failed_cases"] = status.get("failed_cases", 0) + 1
      self.print(f"[{section}] {label}: {_error_text(error)}")
    wall = time.perf_counter() - start
    self._last[section] = (wall - self._cost[1], self._cost[1], work)
    self.save()

  def jit(self, fn: Callable) -> Callable:
    """jax.jit(fn); with --tiny compiled with _FAST_COMPILE (once per operand shapes)."""
    jitted = jax.jit(fn)
    if not self.tiny:
      return jitted
    compiled = {}

    def call(*operands):
      key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(operands))
      if key not in compiled:
        compiled[key] = jitted.lower(*operands).compile(compiler_options=_FAST_COMPILE)
      return compiled[key](*operands)

    return call

  def timed(self, fn: Callable, *operands) -> tuple[float | None, str]:
    """Median seconds of jitted fn(*operands) (bench.time_call), or None and why not."""
    start = time.perf_counter()
    try:
      seconds = bench.time_call(self.jit(fn), *operands, iters=self.plan.iters)
    except Exception as error:  # noqa: BLE001 (a baseline may be unavailable here)
      self._cost[0] += time.perf_counter() - start
      return None, _error_text(error)
    runs = (self.plan.iters + 1) * seconds
    self._cost[0] += max(time.perf_counter() - start - runs, 0.0)
    self._cost[1] += runs
    return seconds, ""

  def timing_rows(self, section: str, case: str, times: dict, baselines: Sequence[str],
                  work: dict | None = None, unit: str = "TFLOP/s",
                  impls: Sequence[str] | None = None, **extra) -> None:
    """Rows of times[(impl, direction)] = (seconds, note) (for `impls` only, default all),
    each with its ratios against the baselines of the same direction (baseline seconds /
    these seconds)."""
    scale = {"TFLOP/s": 1e12, "GB/s": 1e9}[unit]
    for (impl, direction), (seconds, note) in times.items():
      if impls is not None and impl not in impls:
        continue
      row = {"section": section, "case": case, "impl": impl, "direction": direction,
             "seconds": seconds, **extra}
      if seconds is None:
        row["note"] = note
      else:
        if work and work.get(direction):
          row["rate"], row["unit"] = work[direction] / seconds / scale, unit
        row["ratios"] = {
            name: times[(name, direction)][0] / seconds for name in baselines
            if name != impl and times.get((name, direction), (None,))[0] is not None}
      self.add(row)
      shown = (f"{1e3 * seconds:.3f} ms " + " ".join(
          f"{r:.2f}x vs {n}" for n, r in row["ratios"].items()) if seconds is not None
               else f"unavailable: {note}")
      self.print(f"[{section}] {case} {impl} {direction}: {shown}")

  # ------------------------------------------------------------------------------ run --

  def run(self, sections: Sequence[str]) -> dict[str, Any]:
    """Every section of `sections` in SECTIONS' order; returns the results."""
    runners = {"correctness": self.correctness, "block_sparse": self.block_sparse_timings,
               "flash": self.flash_timings, "decode": self.decode_timings,
               "scan": self.scan_timings, "linear": self.linear_timings, "dit": self.dit}
    self.save()
    current = None
    try:
      peaks = bench.measure_peaks(jnp.dtype(self.plan.timing_dtype), self.tiny,
                                  self.plan.iters)
      self.results["peaks"] = dataclasses.asdict(peaks)
      for name in SECTIONS:
        status = self.results["sections"][name]
        if name not in sections:
          status["status"] = "not asked for (--sections)"
          continue
        current = name
        start = time.perf_counter()
        status["status"] = "running"
        try:
          runners[name]()
          status["status"] = _section_status(status)
        except Exception as error:  # noqa: BLE001 (the later sections still run)
          status["status"] = f"failed: {_error_text(error)}"
          self.print(f"[{name}] {status['status']}")
        status["seconds"] = time.perf_counter() - start
        self.save()
        self.print(f"[{name}] {status['status']} in {status['seconds']:.1f} s; "
                   f"{self.left_s():.0f} s of the budget left")
    except Stopped:
      self.results["stopped"] = True
      later = SECTIONS if current is None else SECTIONS[SECTIONS.index(current) + 1:]
      if current is not None:
        self.results["sections"][current]["status"] = "stopped by SIGTERM"
      for name in later:
        if name in sections:
          self.results["sections"][name]["status"] = "not run (stopped by SIGTERM)"
    self.save()
    return self.results

  # ---------------------------------------------------------------------- correctness --

  def _compare(self, kernel: str, case: str, forward: Callable, operands: tuple,
               impls: Sequence[str], argnums: Sequence[int], names: Sequence[str],
               seed: int) -> None:
    """forward(impl, *operands) of each impl against forward("reference", ...): the output
    and, for argnums, the gradients of <output, random cotangent> (one jitted vjp)."""
    argnums = tuple(argnums)
    out_shape = jax.eval_shape(lambda *ops: forward("reference", *ops), *operands)
    cotangent = jnp.asarray(np.random.default_rng(seed).standard_normal(out_shape.shape),
                            out_shape.dtype)

    def outputs_and_gradients(impl, *ops):
      def of_differentiated(*differentiated):
        full = list(ops)
        for index, x in zip(argnums, differentiated):
          full[index] = x
        return forward(impl, *full)

      out, pullback = jax.vjp(of_differentiated, *(ops[i] for i in argnums))
      return (out, *pullback(cotangent)) if argnums else (out,)

    def outputs(impl):
      results = self.jit(functools.partial(outputs_and_gradients, impl))(*operands)
      return [np.asarray(x, np.float64) for x in results]

    want = outputs("reference")
    tolerances = TOLERANCES[self.plan.kernel_impl]
    for impl in impls:
      try:
        got = outputs(impl)
      except Exception as error:  # noqa: BLE001 (recorded as a failed check)
        self.add({"section": "correctness", "kernel": kernel, "impl": impl, "case": case,
                  "quantity": "all", "passed": False, "error": _error_text(error)})
        self.print(f"[correctness] {kernel} {impl} {case}: FAILED {_error_text(error)}")
        continue
      for name, g, w in zip(names, got, want):
        error = float(np.max(np.abs(g - w), initial=0.0))
        scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-2)
        tolerance = tolerances["out" if name == "out" else "grad"]
        passed = bool(np.all(np.isfinite(g))) and error <= tolerance * scale
        self.add({"section": "correctness", "kernel": kernel, "impl": impl, "case": case,
                  "quantity": name, "max_abs_error": error, "max_abs_reference": scale,
                  "relative_error": error / scale, "tolerance": tolerance,
                  "passed": passed})
        self.print(f"[correctness] {kernel} {impl} {case} {name}: max abs error "
                   f"{error:.2e} ({error / scale:.1e} of max|ref|) "
                   f"{'ok' if passed else 'FAILED'}")

  def correctness(self) -> None:
    plan, impl = self.plan, self.plan.kernel_impl
    f32 = jnp.float32

    def normal(rng, shape):
      return jnp.asarray(rng.standard_normal(shape, np.float32), f32)

    for index, (b, sq, skv, h, hkv, d, causal) in enumerate(plan.flash_cases):
      label = _label_attention(b, sq, skv, h, hkv, d, causal)

      def flash_case(b=b, sq=sq, skv=skv, h=h, hkv=hkv, d=d, causal=causal, label=label,
                     seed=index):
        rng = np.random.default_rng(seed)
        operands = (normal(rng, (b, sq, h, d)), normal(rng, (b, skv, hkv, d)),
                    normal(rng, (b, skv, hkv, d)))
        self._compare("flash_attention", label,
                      lambda i, q, k, v: flash_attention(q, k, v, causal=causal, impl=i),
                      operands, [impl], (0, 1, 2), ("out", "dq", "dk", "dv"), seed)

      self.case("correctness", f"flash_attention {label}", 1.0, flash_case)

    for index, (b, s, h, hkv, d, block, density) in enumerate(plan.block_sparse_cases):
      label = (f"{_label_attention(b, s, s, h, hkv, d, True)} b{block} "
               f"{100 * density:.0f}% of causal blocks")

      def block_sparse_case(b=b, s=s, h=h, hkv=hkv, d=d, block=block, density=density,
                            label=label, seed=10 + index):
        rng = np.random.default_rng(seed)
        operands = (normal(rng, (b, s, h, d)), normal(rng, (b, s, hkv, d)),
                    normal(rng, (b, s, hkv, d)))
        num_blocks = -(-s // block)
        mask = np.concatenate([bench.random_block_mask(rng, h, num_blocks, density,
                                                       causal=True) for _ in range(b)])
        blocks = BlockList.from_block_mask(mask, block, block)
        self._compare("block_sparse_attention", label,
                      lambda i, q, k, v: block_sparse_attention(q, k, v, blocks, causal=True,
                                                                impl=i),
                      operands, self._impls(impl, "xla"), (0, 1, 2),
                      ("out", "dq", "dk", "dv"), seed)

      self.case("correctness", f"block_sparse_attention {label}", 1.0, block_sparse_case)

    for index, (b, length, channels, groups, state) in enumerate(plan.scan_cases):
      label = (f"B{b} L{length} D{channels} N{state}"
               + (f" groups {groups}" if groups else ""))

      def scan_case(b=b, length=length, channels=channels, groups=groups, state=state,
                    label=label, seed=20 + index):
        rng = np.random.default_rng(seed)
        u, delta, A, B, C, D, z, bias = bench.scan_operands(rng, b, length, channels, state,
                                                            f32)
        if groups:
          B, C = (normal(rng, (b, length, groups, state)) for _ in range(2))
        self._compare("selective_scan", label,
                      lambda i, *ops: selective_scan(*ops[:5], D=ops[5], z=ops[6],
                                                     delta_bias=ops[7], delta_softplus=True,
                                                     impl=i),
                      (u, delta, A, B, C, D, z, bias), self._impls(impl, "sequential"), range(8),
                      ("out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"),
                      seed)

      self.case("correctness", f"selective_scan {label}", 1.0, scan_case)

    for index, (b, length, h, d, chunk) in enumerate(plan.linear_cases):
      label = f"B{b} L{length} H{h} D{d} chunk {chunk}, per-head decay"

      def linear_case(b=b, length=length, h=h, d=d, chunk=chunk, label=label,
                      seed=30 + index):
        rng = np.random.default_rng(seed)
        operands = bench.linear_attention_operands(rng, b, length, h, d, f32)
        self._compare("chunked_linear_attention", label,
                      lambda i, q, k, v, w: chunked_linear_attention(q, k, v, w,
                                                                     chunk_size=chunk,
                                                                     impl=i),
                      operands, self._impls(impl, "chunked"), (0, 1, 2, 3),
                      ("out", "dq", "dk", "dv", "dlog_decay"), seed)

      self.case("correctness", f"chunked_linear_attention {label}", 1.0, linear_case)

    module = _decode_module()
    for index, (b, tq, h, hkv, d, cache, lengths) in enumerate(plan.decode_cases):
      label = (f"B{b} Tq{tq} {_label_attention(1, cache, cache, h, hkv, d)[3:]} "
               f"kv_lengths {list(lengths)}")
      if module is None:
        self._decode_missing("correctness", f"decode_attention {label}")
        continue
      variants = {impl: dict(impl=impl),
                  f"{impl} single-pass": dict(impl=impl, num_splits=b * hkv),
                  "xla": dict(impl="xla"), "reference": dict(impl="reference")}

      def decode_case(b=b, tq=tq, h=h, hkv=hkv, d=d, cache=cache, lengths=lengths,
                      label=label, variants=variants, seed=40 + index):
        rng = np.random.default_rng(seed)
        operands = (normal(rng, (b, tq, h, d)), normal(rng, (b, cache, hkv, d)),
                    normal(rng, (b, cache, hkv, d)), jnp.asarray(lengths, jnp.int32))
        self._compare("decode_attention", label,
                      lambda i, q, k, v, n: module.decode_attention(q, k, v, n,
                                                                    **variants[i]),
                      operands, self._impls(*(n for n in variants if n != "reference")),
                      (), ("out",), seed)

      self.case("correctness", f"decode_attention {label}", 1.0, decode_case)

  def _impls(self, kernel_impl: str, *others: str) -> list[str]:
    """What correctness compares with the reference: every impl, or the kernel's alone."""
    return [kernel_impl, *others] if self.plan.every_impl else [kernel_impl]

  def _decode_missing(self, section: str, label: str) -> None:
    reason = "not run: pallas_kernels/decode_attention.py is not in this checkout"
    self.add({"section": section, "case": label, "skipped": reason})
    self.results["sections"][section]["missing_decode"] = True
    self.print(f"[{section}] {label}: {reason}")

  # -------------------------------------------------------------------------- timings --

  def _dtype(self):
    return jnp.dtype(self.plan.timing_dtype)

  def block_sparse_timings(self) -> None:
    plan, impl, dense = self.plan, self.plan.kernel_impl, self.plan.dense_impl
    heads, dim, block = plan.block_sparse_heads, plan.block_sparse_dim, plan.block_sparse_block
    for seq in plan.block_sparse_lengths:
      rng = np.random.default_rng(seq)
      shape = (1, seq, heads, dim)
      operands = tuple(jnp.asarray(rng.standard_normal(shape, np.float32), self._dtype())
                       for _ in range(3))
      dense_flops = 4 * heads * seq * seq * dim / 2
      dense_times: dict = {}
      label = _label_attention(1, seq, seq, heads, heads, dim, True)

      def dense_case(operands=operands, dense_times=dense_times, label=label,
                     dense_flops=dense_flops):
        for name in (dense, impl):
          dense_times[(f"dense {name}", "fwd")] = self.timed(
              lambda q, k, v, name=name: flash_attention(q, k, v, causal=True, impl=name),
              *operands)
        self.timing_rows("block_sparse", f"{label} dense", dense_times,
                         [f"dense {dense}"], {"fwd": dense_flops})

      self.case("block_sparse", f"{label} dense", 2 * dense_flops, dense_case)
      num_blocks = -(-seq // block)
      for density in plan.densities:
        mask = bench.random_block_mask(rng, heads, num_blocks, density, causal=True)
        causal_pairs = num_blocks * (num_blocks + 1) / 2
        of_causal = float(mask.sum()) / (heads * causal_pairs)
        listed = float(mask.sum()) / (heads * num_blocks * num_blocks)
        case = f"{label} b{block} {100 * of_causal:.1f}% of causal blocks"
        flops = 4 * heads * seq * seq * dim * listed

        def sparse_case(operands=operands, mask=mask, case=case, flops=flops,
                        dense_times=dense_times, density=density, of_causal=of_causal):
          blocks = BlockList.from_block_mask(mask, block, block)
          times = dict(dense_times)
          times[(impl, "fwd")] = self.timed(
              lambda q, k, v: block_sparse_attention(q, k, v, blocks, causal=True,
                                                     impl=impl), *operands)
          self.timing_rows("block_sparse", case, times, [f"dense {dense}", f"dense {impl}"],
                           {"fwd": flops}, impls=[impl], density=density,
                           causal_block_fraction=of_causal)

        self.case("block_sparse", case, flops, sparse_case)

  def flash_timings(self) -> None:
    impl, dense = self.plan.kernel_impl, self.plan.dense_impl
    for batch, seq, heads, dim, causal in self.plan.flash_timings:
      label = _label_attention(batch, seq, seq, heads, heads, dim, causal)
      flops = 4 * batch * heads * seq * seq * dim / (2 if causal else 1)

      def flash_case(batch=batch, seq=seq, heads=heads, dim=dim, causal=causal, label=label,
                     flops=flops):
        rng = np.random.default_rng(seq + dim)
        operands = tuple(jnp.asarray(rng.standard_normal((batch, seq, heads, dim),
                                                         np.float32), self._dtype())
                         for _ in range(3))
        times = {}
        for name in (impl, dense):
          def forward(q, k, v, name=name):
            return flash_attention(q, k, v, causal=causal, impl=name)

          times[(name, "fwd")] = self.timed(forward, *operands)
          if self.plan.every_impl:
            times[(name, "fwd+bwd")] = self.timed(
                bench.sum_gradient(forward, (0, 1, 2)), *operands)
        self.timing_rows("flash", label, times, [dense],
                         {"fwd": flops, "fwd+bwd": 3.5 * flops})

      self.case("flash", label, 4.5 * flops, flash_case)

  def decode_timings(self) -> None:
    plan, impl, dense = self.plan, self.plan.kernel_impl, self.plan.dense_impl
    module = _decode_module()
    batch, heads, kv_heads, dim = (plan.decode_batch, plan.decode_heads, plan.decode_kv_heads,
                                   plan.decode_dim)
    single = f"{impl} single-pass"
    for cache in plan.decode_lengths:
      label = f"B{batch} Tq1 H{heads}/{kv_heads} D{dim} cache {cache}"
      if module is None:
        self._decode_missing("decode", label)
        continue
      cache_bytes = 2 * batch * cache * kv_heads * dim * self._dtype().itemsize

      def decode_case(cache=cache, label=label, cache_bytes=cache_bytes):
        rng = np.random.default_rng(cache)
        q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim), np.float32),
                        self._dtype())
        k, v = (jnp.asarray(rng.standard_normal((batch, cache, kv_heads, dim), np.float32),
                            self._dtype()) for _ in range(2))
        lengths = jnp.full((batch,), cache, jnp.int32)
        variants = {impl: dict(impl=impl),
                    single: dict(impl=impl, num_splits=batch * kv_heads),
                    "xla split-K": dict(impl="xla")}
        times = {}
        for name, kwargs in variants.items():
          times[(name, "fwd")] = self.timed(
              lambda q, k, v, n, kwargs=kwargs: module.decode_attention(q, k, v, n, **kwargs),
              q, k, v, lengths)
        # The whole cache is valid, so plain attention of the new token computes the same.
        for name in (f"flash {impl}", f"dense {dense}"):
          times[(name, "fwd")] = self.timed(
              lambda q, k, v, name=name: flash_attention(q, k, v, impl=name.split()[-1]),
              q, k, v)
        self.timing_rows("decode", label, times, [single, f"flash {impl}"],
                         {"fwd": cache_bytes}, unit="GB/s")

      self.case("decode", label, cache_bytes, decode_case)

  def scan_timings(self) -> None:
    batch, length, channels, state = self.plan.scan_shape
    impl = self.plan.kernel_impl
    label = f"B{batch} L{length} D{channels} N{state}"

    def scan_case():
      operands = bench.scan_operands(np.random.default_rng(0), batch, length, channels, state,
                                     self._dtype())
      paths = {impl: impl, "associative (reference)": "reference",
               "lax.scan (sequential)": "sequential"}
      times = {}
      for name, path in paths.items():
        def forward(*ops, path=path):
          return selective_scan(*ops[:5], D=ops[5], z=ops[6], delta_bias=ops[7],
                                delta_softplus=True, impl=path)

        times[(name, "fwd")] = self.timed(forward, *operands)
        if self.plan.every_impl:
          times[(name, "fwd+bwd")] = self.timed(
              bench.sum_gradient(forward, range(8)), *operands)
      self.timing_rows("scan", label, times, list(paths)[1:])

    self.case("scan", label, 1.0, scan_case)

  def linear_timings(self) -> None:
    batch, length, heads, dim, chunk = self.plan.linear_shape
    impl = self.plan.kernel_impl
    label = f"B{batch} L{length} H{heads} D{dim} chunk {chunk}, per-head decay"

    def linear_case():
      operands = bench.linear_attention_operands(np.random.default_rng(0), batch, length,
                                                 heads, dim, self._dtype())
      paths = {impl: impl, "chunked (jnp)": "chunked", "reference (recurrence)": "reference"}
      times = {}
      for name, path in paths.items():
        def forward(q, k, v, w, path=path):
          return chunked_linear_attention(q, k, v, w, chunk_size=chunk, impl=path)

        times[(name, "fwd")] = self.timed(forward, *operands)
        if self.plan.every_impl:
          times[(name, "fwd+bwd")] = self.timed(
              bench.sum_gradient(forward, range(4)), *operands)
      self.timing_rows("linear", label, times, list(paths)[1:])

    self.case("linear", label, 1.0, linear_case)

  def dit(self) -> None:
    from experiments.benchmarks import dit_throughput  # pylint: disable=g-import-not-at-top
    settings = dict(self.plan.dit)
    label = (f"DiT-{settings['size']}/{settings['patch']} on {settings['data']}, "
             f"batch {settings['batch']}")

    def dit_case():
      lines = []
      result = dit_throughput.run_benchmark(print_fn=lines.append, **settings)
      for line in lines:
        self.print(f"[dit] {line}")
      for row in result["rows"]:
        self.add({"section": "dit", "case": label, "model": row["model"],
                  "mixer": row["mixer"], "objective": row["objective"],
                  "tokens": row["tokens"], "batch": row["batch"],
                  "images_per_second": row["images_per_second"],
                  "step_seconds": row["step_seconds"],
                  "compile_seconds": row["compile_seconds"], "step_gflop": row["step_gflop"],
                  "mfu": row["mfu"], "peak": result["peak"]["source"],
                  "losses_finite": row["losses_finite"],
                  "ratio_vs_baseline": (result.get("throughput_ratio")
                                        if row["mixer"] == "attention" else None)})

    self.case("dit", label, 1.0, dit_case, default_estimate=self.plan.dit_estimate_s)


# --------------------------------------------------------------------------- markdown --

def _ms(seconds) -> str:
  return "-" if seconds is None else f"{1e3 * seconds:.3f}"


def render_markdown(results: dict[str, Any]) -> str:
  """The results as a report: header (device, versions, date, command), then a table per
  section."""
  lines = ["# Pallas kernels on the device: correctness and timings", ""]
  if results["tiny"]:
    lines += [f"**{results['note']}** (`--tiny`: tiny sizes, `interpret` kernels, XLA "
              "attention in place of cuDNN; only checks that the script runs).", ""]
  peaks = results.get("peaks")
  lines += [
      f"- Device: {results['device']} ({results['platform']}, {results['device_count']} "
      f"device(s)); jax {results['jax_version']}, jaxlib {results['jaxlib_version']}, "
      f"Python {results['python_version']}",
      f"- Date: {results['date']}",
      f"- Command: `{results['command']}`",
      f"- Mode: {results['note']}",
      f"- Budget {results['budget_s']:.0f} s, used {results['elapsed_s']:.0f} s"
      + ("; stopped by SIGTERM" if results.get("stopped") else ""),
      "- Timings: " + results["timing_dtype"] + f", median of {results['iters']} calls after a "
      "compile-and-warm-up call; ratio = baseline time / this time, both from this run "
      "(> 1: faster than the baseline)",
  ]
  if peaks:
    lines.append(f"- Measured peaks in this run ({results['timing_dtype']} matmul, float32 "
                 f"copy): {peaks['matmul_tflops']:.1f} TFLOP/s, {peaks['hbm_gbps']:.0f} GB/s")
  lines += ["", "| section | status | seconds |", "| --- | --- | --- |"]
  for name, status in results["sections"].items():
    seconds = status.get("seconds")
    lines.append(f"| {name} | {status['status']} | "
                 f"{'-' if seconds is None else f'{seconds:.1f}'} |")
  rows = results["rows"]
  by_section: dict[str, list] = {}
  for row in rows:
    by_section.setdefault(row["section"], []).append(row)

  correctness = by_section.get("correctness", [])
  if correctness:
    tol = results["tolerances"]
    lines += ["", "## Correctness (float32, against each kernel's reference)", "",
              f"Passed when max abs error <= tol x max(max|reference|, 1e-2); tol "
              f"{tol['out']:g} for outputs, {tol['grad']:g} for gradients.", "",
              "| kernel | impl | case | quantity | max abs error | max abs reference | "
              "relative | pass |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in correctness:
      if "quantity" not in row:
        lines.append(f"| {row['case']} | | | | | | | "
                     f"{row.get('skipped') or row.get('error')} |")
      elif "error" in row:
        lines.append(f"| {row['kernel']} | {row['impl']} | {row['case']} | all | | | | "
                     f"FAILED: {row['error']} |")
      else:
        lines.append(f"| {row['kernel']} | {row['impl']} | {row['case']} | {row['quantity']}"
                     f" | {row['max_abs_error']:.2e} | {row['max_abs_reference']:.3g} | "
                     f"{row['relative_error']:.1e} | {'yes' if row['passed'] else 'NO'} |")

  titles = {"block_sparse": "Block-sparse attention against dense causal attention (forward)",
            "flash": "Flash attention against cuDNN",
            "decode": "Decode attention (split-K) against single-pass decoding",
            "scan": "Selective scan", "linear": "Chunked linear attention"}
  for section, title in titles.items():
    section_rows = by_section.get(section, [])
    if not section_rows:
      continue
    lines += ["", f"## {title}", "", "| case | impl | direction | ms | rate | ratios |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in section_rows:
      if "impl" not in row:
        lines.append(f"| {row['case']} | | | | | {row.get('skipped') or row.get('error')} |")
        continue
      rate = f"{row['rate']:.3g} {row['unit']}" if row.get("rate") else "-"
      ratios = ("; ".join(f"{r:.2f}x vs {n}" for n, r in row["ratios"].items())
                if row["seconds"] is not None else f"unavailable: {row['note']}")
      lines.append(f"| {row['case']} | {row['impl']} | {row['direction']} | "
                   f"{_ms(row['seconds'])} | {rate} | {ratios} |")

  dit_rows = by_section.get("dit", [])
  if dit_rows:
    lines += ["", "## DiT training step (experiments/benchmarks/dit_throughput.py)", "",
              "| model | objective | tokens | batch | images/s | ms/step | compile s | "
              "GFLOP/step | MFU | vs baseline |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in dit_rows:
      if "model" not in row:
        lines.append(f"| {row['case']} | | | | | | | | | "
                     f"{row.get('skipped') or row.get('error')} |")
        continue
      ratio = row["ratio_vs_baseline"]
      lines.append(
          f"| {row['model']} | {row['objective']} | {row['tokens']} | {row['batch']} | "
          f"{row['images_per_second']:.1f} | {1e3 * row['step_seconds']:.1f} | "
          f"{row['compile_seconds']:.1f} | {row['step_gflop']:.2f} | "
          f"{100 * row['mfu']:.1f}% ({row['peak']}) | "
          f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main --

def _command(argv: Sequence[str]) -> str:
  """The command line as run; an --out_dir equal to $OUT is written as $OUT (the device's
  folder for results that come back, a different path each time)."""
  out = os.environ.get("OUT")
  words = []
  for arg in argv:
    if out and arg in (f"--out_dir={out}", f"--out_dir={out.rstrip('/')}"):
      words.append("--out_dir=$OUT")
    else:
      words.append(shlex.quote(arg))
  return " ".join([COMMAND, *words])


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the check; returns 0 when every section ran and every correctness row passed."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="seconds the whole run may take (sections that would not fit are "
                      "skipped)")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny sizes, interpret-mode kernels, XLA attention: a CPU rehearsal "
                      "(needs --results_dir or --out_dir)")
  parser.add_argument("--results_dir", type=pathlib.Path, default=None,
                      help="where device_kernels.md/.json go (default experiments/results; "
                      "with --tiny, required and not that folder)")
  parser.add_argument("--out_dir", type=pathlib.Path, default=None,
                      help="also write the results here (on the device: $OUT)")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument("--iters", type=int, default=None,
                      help="timed calls per measurement (default 5; 1 with --tiny)")
  args = parser.parse_args(argv)
  sections = [name for name in args.sections.split(",") if name]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    parser.error(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
  if args.budget_s <= 0:
    parser.error(f"--budget_s must be > 0, got {args.budget_s}")
  if args.iters is not None and args.iters < 1:
    parser.error(f"--iters must be >= 1, got {args.iters}")
  if args.tiny:
    if args.results_dir is None and args.out_dir is None:
      parser.error("--tiny needs --results_dir or --out_dir (its results must not replace "
                   "the committed device results)")
    for path in (args.results_dir, args.out_dir):
      if path is not None and path.resolve() == COMMITTED_RESULTS_DIR.resolve():
        parser.error(f"--tiny results must not go to "
                     f"{COMMITTED_RESULTS_DIR.relative_to(REPO_ROOT)} (the committed device "
                     "results); pass another folder")
  elif compat.default_backend() != "gpu":
    parser.error(f"the device check needs a GPU (jax sees {compat.default_backend()}); "
                 "rehearse it on CPU with --tiny --results_dir=DIR")
  plan = TINY_PLAN if args.tiny else DEVICE_PLAN
  if args.iters is not None:
    plan = dataclasses.replace(plan, iters=args.iters)
  result_dirs = []
  for directory in (args.results_dir if args.tiny else
                    (args.results_dir or COMMITTED_RESULTS_DIR), args.out_dir):
    if directory is not None and directory.resolve() not in [d.resolve() for d in result_dirs]:
      result_dirs.append(directory)
  previous_handler = signal.signal(signal.SIGTERM, _stop)
  try:
    check = DeviceCheck(plan, tiny=args.tiny, budget_s=args.budget_s, command=_command(argv),
                        result_dirs=result_dirs)
    results = check.run(sections)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  for directory in result_dirs:
    print(f"results: {directory / RESULTS_NAME}.md and .json")
  failed = [row for row in results["rows"]
            if row["section"] == "correctness" and row.get("passed") is False]
  incomplete = [name for name in sections
                if results["sections"][name]["status"] != "done"]
  if failed or incomplete:
    print(f"{len(failed)} correctness row(s) failed; sections not done: {incomplete}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
