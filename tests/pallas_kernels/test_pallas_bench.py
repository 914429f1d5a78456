"""The benchmark harness runs end to end (tiny shapes; CPU via interpret)."""
from __future__ import annotations

import pytest

from pallas_kernels import bench


def test_quick_bench_prints_every_kernel(capsys):
  bench.main(["--quick", "--iters", "1"])
  out = capsys.readouterr().out
  assert "# measured peaks" in out
  for kernel, unit in (("attention", "TFLOP/s"), ("selective_scan", "GB/s"),
                       ("linear_attention", "TFLOP/s"),
                       ("block_sparse", "TFLOP/s"), ("decode", "GB/s")):
    rows = [line for line in out.splitlines() if line.startswith(kernel)]
    assert rows and all(unit in line for line in rows), (kernel, out)
    assert all(" vs " in line for line in rows), out
  assert "vs dense xla" in out  # block-sparse against dense attention
  assert "floors: HBM" in out
  assert "unavailable" not in out


def test_scan_shape_sets_the_scan_benchmark_shape(capsys):
  bench.main(["--quick", "--iters", "1", "--kernels", "scan",
              "--scan_shape", "2,9,3,2"])
  rows = [line for line in capsys.readouterr().out.splitlines()
          if line.startswith("selective_scan")]
  # The three impls (interpret mode with --quick), forward and backward.
  assert len(rows) == 6 and all("B2 L9 D3 N2" in line for line in rows)
  with pytest.raises(SystemExit):
    bench.main(["--quick", "--scan_shape", "2,9,3"])
