"""Benchmarks: `python -m pallas_kernels.bench [--quick] [--kernels ...]`.

Prints, per kernel, shape and implementation, the median wall time of a
jitted call, its throughput (TFLOP/s for attention and linear attention,
GB/s of compulsory HBM traffic for the selective scan), that throughput as a
fraction of the device's peak measured in the same run, and the speed ratio
against the baselines measured in the same run (baseline time / this time,
so > 1 means faster than the baseline).

Conventions:
- attention forward FLOPs 4 * B * H * Sq * Skv * D, halved when causal;
  backward 2.5x forward, timed as (forward + backward) - forward;
- selective scan bytes: u, delta, z and y once each ([B, L, channels]),
  B and C once ([B, L, groups, N]); floors printed for the forward: bytes /
  measured HBM bandwidth and exponentials (B L channels N) / measured exp
  throughput; backward timed like attention's, its bytes also counting dy
  and the gradients written;
- chunked linear attention FLOPs per token and head: 2 c (Dk + Dv) + 4 Dk Dv
  (chunk c: intra-chunk scores and values, state read-out and update),
  forward only; baselines the jnp chunked form and the sequential scan;
- block-sparse attention FLOPs 4 * B * H * Sq * Skv * D times the listed
  fraction of key blocks, forward only; baselines dense attention of the same
  shape (XLA's, and on GPU cuDNN's and the flash kernel).
- decode attention (one new token per sequence against a KV cache, forward):
  GB/s of the valid keys and values read once; baselines single-pass masked
  attention (`jax.nn.dot_product_attention` with the length mask, and the
  float32 reference). On CPU the split-K `xla` path at caches of 4K to 32K.

Shapes on GPU: the target grid (B*S = 16k tokens, H*D = 2048, D in {64,
128}, S from 512 to 16k, causal and not; scan batch 8, channels 2048, state
16, length 2k; linear attention length 4k). `--quick` runs tiny shapes, so
that the harness itself is exercised on CPU (through interpret mode, whose
times mean nothing about kernel speed). `--scan_shape=B,L,D,N` times the
scan at a model's size instead; on CPU, without --quick, that compares the
two jnp scans alone (the associative scan and `lax.scan`, which
`impl="auto"` picks for large scans there).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels.block_sparse_attention import (BlockList,
                                                   block_sparse_attention)
from pallas_kernels.chunked_linear_attention import chunked_linear_attention
from pallas_kernels.decode_attention import decode_attention, visible_mask
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.selective_scan import (reference_scan, selective_scan,
                                           sequential_scan)


@dataclasses.dataclass
class Peaks:
  """The device's measured peaks (same run, same process)."""
  matmul_tflops: float
  hbm_gbps: float
  exp_per_s: float


def time_call(fn: Callable, *args, iters: int) -> float:
  """Median seconds of fn(*args) after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_peaks(dtype, quick: bool, iters: int) -> Peaks:
  """Dense matmul TFLOP/s, copy bandwidth and exp throughput via XLA."""
  rng = np.random.default_rng(0)
  n = 256 if quick else 8192
  a = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul_s = time_call(matmul, a, iters=iters)
  elements = (1 << 16) if quick else (1 << 28)
  x = jnp.asarray(rng.standard_normal(elements, np.float32))
  # x + 1 reads and writes every byte once (a copy XLA cannot elide).
  copy_s = time_call(jax.jit(lambda x: x + 1.0), x, iters=iters)
  chain = 16

  def exps(x):  # 16 dependent exps per element: special-function bound
    for _ in range(chain):
      x = jnp.exp(-jnp.abs(x))
    return x

  exp_s = time_call(jax.jit(exps), x, iters=iters)
  return Peaks(matmul_tflops=2 * n**3 / matmul_s / 1e12,
               hbm_gbps=2 * x.nbytes / copy_s / 1e9,
               exp_per_s=chain * elements / exp_s)


@dataclasses.dataclass
class Row:
  kernel: str
  shape: str
  impl: str
  direction: str
  seconds: float
  throughput: float       # TFLOP/s or GB/s
  unit: str
  peak_fraction: float
  note: str = ""


def _print_rows(rows: Sequence[Row], baselines: dict) -> None:
  for row in rows:
    ratios = []
    for name, seconds in baselines.get((row.kernel, row.shape,
                                        row.direction), {}).items():
      if name != row.impl and seconds is not None:
        ratios.append(f"{seconds / row.seconds:.2f}x vs {name}")
    print(f"{row.kernel:<18} {row.shape:<34} {row.impl:<11} "
          f"{row.direction:<4} {row.seconds * 1e3:10.3f} ms "
          f"{row.throughput:9.2f} {row.unit:<7} {100 * row.peak_fraction:6.1f}%"
          f"  {'; '.join(ratios)}{'  ' + row.note if row.note else ''}")
  sys.stdout.flush()


def _try_time(fn, *args, iters):
  """Seconds, or None (with the reason) when this impl cannot run here."""
  try:
    return time_call(fn, *args, iters=iters), ""
  except Exception as error:  # noqa: BLE001 (a baseline may be unavailable)
    return None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"


def _forward_row(kernel: str, label: str, impl: str, fn: Callable, operands,
                 flops: float, peaks: Peaks, times: dict, iters: int) -> list[Row]:
  """Times fn(*operands) into times[(kernel, label, "fwd")][impl]: [its Row],
  or [] (with a printed reason) when this impl cannot run here."""
  seconds, note = _try_time(fn, *operands, iters=iters)
  times.setdefault((kernel, label, "fwd"), {})[impl] = seconds
  if seconds is None:
    print(f"{kernel:<18} {label:<34} {impl:<11} fwd  unavailable: {note}")
    return []
  tflops = flops / seconds / 1e12
  return [Row(kernel, label, impl, "fwd", seconds, tflops, "TFLOP/s",
              tflops / peaks.matmul_tflops)]


def sum_gradient(fn: Callable, argnums: Sequence[int]) -> Callable:
  """The gradient of sum(fn(*operands)) (in float32) with respect to the
  operands at argnums: what the forward + backward timings run."""
  def loss(*operands):
    return jnp.sum(fn(*operands).astype(jnp.float32))
  return jax.grad(loss, argnums=tuple(argnums))


def scan_operands(rng: np.random.Generator, batch: int, length: int,
                  channels: int, state: int, dtype) -> tuple:
  """Random (u, delta, A, B, C, D, z, delta_bias) of a Mamba-style selective
  scan (to run with delta_softplus=True): A = -exp(.) < 0, B and C
  [batch, length, state] shared by all channels, A, D and delta_bias
  float32."""
  seq = (batch, length, channels)

  def normal(shape, scale=1.0, dt=dtype):
    return jnp.asarray(scale * rng.standard_normal(shape, np.float32), dt)

  u, z = normal(seq), normal(seq)
  delta = normal(seq, 0.5)
  A = -jnp.exp(normal((channels, state), 0.5, jnp.float32))
  B, C = normal((batch, length, state)), normal((batch, length, state))
  D = normal((channels,), 1.0, jnp.float32)
  delta_bias = normal((channels,), 0.5, jnp.float32)
  return u, delta, A, B, C, D, z, delta_bias


def linear_attention_operands(rng: np.random.Generator, batch: int,
                              length: int, heads: int, dim: int,
                              dtype) -> tuple:
  """Random (q, k, v, log_decay) of decayed linear attention: q, k, v
  [batch, length, heads, dim] in dtype, per-head log-decays
  -softplus(-(x + 3)) in float32 (decays near 0.95)."""
  shape = (batch, length, heads, dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
             for _ in range(3))
  log_decay = jnp.asarray(
      -np.log1p(np.exp(-rng.standard_normal(shape[:3], np.float32) - 3.0)))
  return q, k, v, log_decay


def random_block_mask(rng: np.random.Generator, heads: int, num_blocks: int,
                      density: float, *, causal: bool = False) -> np.ndarray:
  """[1, heads, num_blocks, num_blocks] bool: each key block listed with
  probability `density`, the diagonal always; causal: only blocks on or
  below the diagonal (then `density` is the fraction of those)."""
  mask = rng.random((1, heads, num_blocks, num_blocks)) < density
  mask |= np.eye(num_blocks, dtype=bool)[None, None]
  if causal:
    mask &= np.tril(np.ones((num_blocks, num_blocks), bool))[None, None]
  return mask


def bench_attention(args, peaks: Peaks, dtype, pallas_impl: str) -> None:
  if args.quick:
    configs = [(1, 64, 2, 16)]
  else:
    configs = [(16384 // s, s, 2048 // d, d) for d in (64, 128)
               for s in (512, 1024, 2048, 4096, 8192, 16384)]
  impls = [pallas_impl, "xla"] + (["cudnn"] if compat.default_backend()
                                  == "gpu" else [])
  rng = np.random.default_rng(0)
  for batch, seq, heads, dim in configs:
    shape = (batch, seq, heads, dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for _ in range(3))
    for causal in ((False,) if args.quick else (False, True)):
      label = f"B{batch} S{seq} H{heads} D{dim}{' causal' if causal else ''}"
      flops = 4 * batch * heads * seq * seq * dim / (2 if causal else 1)
      times: dict = {}
      rows = []
      for impl in impls:
        def forward(q, k, v, impl=impl):
          return flash_attention(q, k, v, causal=causal, impl=impl)

        forward_backward = sum_gradient(forward, (0, 1, 2))
        fwd_s, note = _try_time(jax.jit(forward), q, k, v, iters=args.iters)
        both_s, note_b = (None, note) if fwd_s is None else _try_time(
            jax.jit(forward_backward), q, k, v, iters=args.iters)
        bwd_s = None if both_s is None else max(both_s - fwd_s, 1e-9)
        for direction, seconds, work, why in (("fwd", fwd_s, flops, note),
                                              ("bwd", bwd_s, 2.5 * flops,
                                               note_b)):
          times.setdefault(("attention", label, direction), {})[impl] = seconds
          if seconds is None:
            print(f"{'attention':<18} {label:<34} {impl:<11} {direction:<4}"
                  f" unavailable: {why}")
            continue
          tflops = work / seconds / 1e12
          rows.append(Row("attention", label, impl, direction, seconds,
                          tflops, "TFLOP/s", tflops / peaks.matmul_tflops))
      _print_rows(rows, times)


def bench_scan(args, peaks: Peaks, dtype, pallas_impl: str) -> None:
  batch, length, channels, state = args.scan_shape or (
      (1, 32, 16, 4) if args.quick else (8, 2048, 2048, 16))
  u, delta, A, B, C, D, z, bias = scan_operands(
      np.random.default_rng(0), batch, length, channels, state, dtype)
  itemsize = jnp.dtype(dtype).itemsize
  bytes_moved = itemsize * (4 * batch * length * channels
                            + 2 * batch * length * state)
  exps = batch * length * channels * state
  floor_s = max(bytes_moved / (peaks.hbm_gbps * 1e9), exps / peaks.exp_per_s)
  label = f"B{batch} L{length} D{channels} N{state}"
  print(f"# selective scan floors: HBM {bytes_moved / peaks.hbm_gbps / 1e6:.3f}"
        f" ms, exp {exps / peaks.exp_per_s * 1e3:.3f} ms")

  def grouped(x):
    return x[:, :, None]

  impls = {}
  if args.quick or pallas_impl == "pallas":  # interpret mode at a real size: hours
    impls[pallas_impl] = lambda *a: selective_scan(
        *a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True,
        impl=pallas_impl)
  impls |= {
      "associative": lambda u, d, A, B, C, D, z, b: reference_scan(
          u, d, A, grouped(B), grouped(C), D, z, b, True)[0],
      "lax.scan": lambda u, d, A, B, C, D, z, b: sequential_scan(
          u, d, A, grouped(B), grouped(C), D, z, b, True)[0],
  }
  operands = (u, delta, A, B, C, D, z, bias)
  # Backward traffic: read u, delta, z, dy and write their three gradients;
  # read B, C and write dB, dC.
  bytes_bwd = itemsize * (7 * batch * length * channels
                          + 4 * batch * length * state)
  times, rows = {}, []
  for name, fn in impls.items():
    forward_backward = sum_gradient(fn, range(8))
    fwd_s, note = _try_time(jax.jit(fn), *operands, iters=args.iters)
    both_s, note_b = (None, note) if fwd_s is None else _try_time(
        jax.jit(forward_backward), *operands, iters=args.iters)
    bwd_s = None if both_s is None else max(both_s - fwd_s, 1e-9)
    for direction, seconds, moved, why in (("fwd", fwd_s, bytes_moved, note),
                                           ("bwd", bwd_s, bytes_bwd, note_b)):
      times.setdefault(("selective_scan", label, direction), {})[name] = (
          seconds)
      if seconds is None:
        print(f"{'selective_scan':<18} {label:<34} {name:<11} {direction:<4}"
              f" unavailable: {why}")
        continue
      gbps = moved / seconds / 1e9
      note_floor = (f"({seconds / floor_s:.1f}x floor)" if direction == "fwd"
                    else "")
      rows.append(Row("selective_scan", label, name, direction, seconds, gbps,
                      "GB/s", gbps / peaks.hbm_gbps, note_floor))
  _print_rows(rows, times)


def bench_linear_attention(args, peaks: Peaks, dtype, pallas_impl: str
                           ) -> None:
  batch, length, heads, dim = ((1, 64, 2, 16) if args.quick
                               else (4, 4096, 16, 128))
  chunk = 16 if args.quick else 64
  q, k, v, log_decay = linear_attention_operands(
      np.random.default_rng(0), batch, length, heads, dim, dtype)
  label = f"B{batch} L{length} H{heads} D{dim} c{chunk}"
  flops = batch * length * heads * (2 * chunk * 2 * dim + 4 * dim * dim)
  times, rows = {}, []
  for impl in (pallas_impl, "chunked", "reference"):
    fn = jax.jit(lambda q, k, v, w, impl=impl: chunked_linear_attention(
        q, k, v, w, chunk_size=chunk, impl=impl))
    rows += _forward_row("linear_attention", label, impl, fn,
                         (q, k, v, log_decay), flops, peaks, times, args.iters)
  _print_rows(rows, times)


def bench_block_sparse(args, peaks: Peaks, dtype, pallas_impl: str) -> None:
  """Block-sparse attention (forward) at several densities against dense
  attention of the same shape: random key blocks per query block (the
  diagonal block always listed), not causal, so the listed fraction is the
  work's."""
  on_gpu = compat.default_backend() == "gpu"
  if args.quick:
    lengths, heads, dim, block, densities = (128,), 2, 16, 16, (0.25,)
  elif on_gpu:
    lengths, heads, dim, block = (4096, 16384, 65536), 16, 128, 128
    densities = (0.05, 0.1, 0.2, 0.5)
  else:  # the long-context character model's attention: 4 heads of 32
    lengths, heads, dim, block = (2048, 8192), 4, 32, 64
    densities = (0.05, 0.1, 0.2, 0.5)
  impls = ["xla"] + ([pallas_impl] if args.quick or on_gpu else [])
  dense_impls = ["xla"] + (["cudnn", pallas_impl] if on_gpu else [])
  rng = np.random.default_rng(0)
  for seq in lengths:
    shape = (1, seq, heads, dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for _ in range(3))
    dense_times = {}
    for impl in dense_impls:
      fn = jax.jit(lambda q, k, v, impl=impl: flash_attention(q, k, v,
                                                              impl=impl))
      dense_times[f"dense {impl}"], note = _try_time(fn, q, k, v,
                                                     iters=args.iters)
      if note:
        print(f"{'block_sparse':<18} {'S' + str(seq):<34} dense {impl} "
              f"unavailable: {note}")
    num_blocks = -(-seq // block)
    for density in densities:
      mask = random_block_mask(rng, heads, num_blocks, density)
      blocks = BlockList.from_block_mask(mask, block, block)
      listed = float(blocks.density(num_blocks))
      label = f"B1 S{seq} H{heads} D{dim} b{block} {100 * listed:.0f}%"
      flops = 4 * heads * seq * seq * dim * listed
      times = {("block_sparse", label, "fwd"): dict(dense_times)}
      rows = []
      for impl in impls:
        fn = jax.jit(lambda q, k, v, impl=impl: block_sparse_attention(
            q, k, v, blocks, impl=impl))
        rows += _forward_row("block_sparse", label, impl, fn, (q, k, v), flops,
                             peaks, times, iters=args.iters)
      _print_rows(rows, times)


def bench_decode(args, peaks: Peaks, dtype, pallas_impl: str) -> None:
  """Decode attention (forward): one query per sequence against caches of
  growing capacity, filled to different lengths (all, 3/4, 1/2, 1/4), GQA;
  the rate counts the valid keys and values (what a kernel must read)."""
  on_gpu = compat.default_backend() == "gpu"
  if args.quick:
    capacities, batch, heads, kv_heads, dim = (128,), 2, 4, 2, 16
  elif on_gpu:
    capacities, batch, heads, kv_heads, dim = (
        (4096, 16384, 65536, 131072), 8, 32, 8, 128)
  else:
    capacities, batch, heads, kv_heads, dim = (
        (4096, 8192, 16384, 32768), 4, 8, 2, 64)
  impls = ["xla"] + ([pallas_impl] if args.quick or on_gpu else [])
  rng = np.random.default_rng(0)
  for capacity in capacities:
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim), np.float32),
                    dtype)
    k, v = (jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim),
                                            np.float32), dtype)
            for _ in range(2))
    lengths = jnp.asarray([capacity * (4 - i % 4) // 4 for i in range(batch)],
                          jnp.int32)
    label = f"B{batch} S{capacity} H{heads}/{kv_heads} D{dim} Tq1"
    moved = 2 * int(lengths.sum()) * kv_heads * dim * jnp.dtype(dtype).itemsize
    fns = {impl: lambda q, k, v, lengths, impl=impl: decode_attention(
        q, k, v, lengths, impl=impl) for impl in impls}
    fns["dense xla"] = lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q, k, v, mask=visible_mask(lengths, 1, capacity)[:, None])
    fns["reference"] = lambda q, k, v, lengths: decode_attention(
        q, k, v, lengths, impl="reference")
    times, rows = {}, []
    for name, fn in fns.items():
      seconds, note = _try_time(jax.jit(fn), q, k, v, lengths,
                                iters=args.iters)
      times.setdefault(("decode", label, "fwd"), {})[name] = seconds
      if seconds is None:
        print(f"{'decode':<18} {label:<34} {name:<11} fwd  unavailable: "
              f"{note}")
      elif name in impls:
        gbps = moved / seconds / 1e9
        rows.append(Row("decode", label, name, "fwd", seconds, gbps, "GB/s",
                        gbps / peaks.hbm_gbps))
    _print_rows(rows, times)


KERNELS = ("attention", "scan", "linear", "block_sparse", "decode")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes (runs on CPU through interpret mode)")
  parser.add_argument("--kernels", default=",".join(KERNELS),
                      help=f"comma-separated subset of {KERNELS}")
  parser.add_argument("--iters", type=int, default=None,
                      help="timed calls per measurement (median)")
  parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                      help="default bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--scan_shape", default=None,
                      type=lambda text: tuple(int(x) for x in text.split(",")),
                      help="the selective scan's batch,length,channels,state "
                      "(e.g. a model's, on CPU: 64,256,128,16)")
  args = parser.parse_args(argv)
  if args.scan_shape is not None and (len(args.scan_shape) != 4
                                      or min(args.scan_shape) < 1):
    parser.error(f"--scan_shape needs 4 positive sizes, got {args.scan_shape}")
  kernels = [name for name in args.kernels.split(",") if name]
  unknown = set(kernels) - set(KERNELS)
  if unknown:
    parser.error(f"unknown kernels {sorted(unknown)}; valid: {KERNELS}")
  backend = compat.default_backend()
  if args.iters is None:
    args.iters = 3 if args.quick else 20
  dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu"
                                   else "bfloat16"))
  # The Pallas kernels compile for GPU only; elsewhere time interpret mode.
  pallas_impl = "pallas" if backend == "gpu" else "interpret"
  devices = jax.devices()
  print(f"# device: {devices[0].device_kind} ({backend}), jax {jax.__version__}"
        f", dtype {dtype.name}, {'quick' if args.quick else 'full'} shapes, "
        f"median of {args.iters}")
  peaks = measure_peaks(dtype, args.quick, args.iters)
  print(f"# measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s, "
        f"copy {peaks.hbm_gbps:.1f} GB/s, exp {peaks.exp_per_s / 1e9:.2f} G/s")
  print(f"# {'kernel':<16} {'shape':<34} {'impl':<11} dir  {'time':>13} "
        f"{'rate':>17} {'%peak':>7}  ratio (baseline time / this time)")
  if "attention" in kernels:
    bench_attention(args, peaks, dtype, pallas_impl)
  if "scan" in kernels:
    bench_scan(args, peaks, dtype, pallas_impl)
  if "linear" in kernels:
    bench_linear_attention(args, peaks, dtype, pallas_impl)
  if "block_sparse" in kernels:
    bench_block_sparse(args, peaks, dtype, pallas_impl)
  if "decode" in kernels:
    bench_decode(args, peaks, dtype, pallas_impl)


if __name__ == "__main__":
  main()
