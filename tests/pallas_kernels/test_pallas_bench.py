"""The benchmark harness runs end to end (tiny shapes; CPU via interpret)."""
from __future__ import annotations

from pallas_kernels import bench


def test_quick_bench_prints_every_kernel(capsys):
  bench.main(["--quick", "--iters", "1"])
  out = capsys.readouterr().out
  assert "# measured peaks" in out
  for kernel, unit in (("attention", "TFLOP/s"), ("selective_scan", "GB/s"),
                       ("linear_attention", "TFLOP/s")):
    rows = [line for line in out.splitlines() if line.startswith(kernel)]
    assert rows and all(unit in line for line in rows), (kernel, out)
    assert all(" vs " in line for line in rows), out
  assert "floors: HBM" in out
  assert "unavailable" not in out
