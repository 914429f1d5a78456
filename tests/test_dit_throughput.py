"""The DiT throughput benchmark (experiments/benchmarks/dit_throughput.py): two real steps of
the smallest DiT, the fields it prints and returns, the baseline ratio and the GPU peak table."""

from __future__ import annotations

import jax
import pytest

from experiments.benchmarks import dit_throughput as bench


def test_two_steps_of_the_smallest_dit_print_images_per_second_and_mfu():
  lines = []
  result = bench.run_benchmark(size="tiny", patch=8, batch=8, depth=1, width=16, heads=2,
                               steps=2, repeats=1, warmup=1, baseline_mixer="",
                               print_fn=lines.append)
  (row,) = result["rows"]
  assert row["model"] == "DiT-tiny/8 (1 x 16, 2 heads)" and row["mixer"] == "attention"
  assert row["batch"] == 8 and row["tokens"] == 16 and row["objective"] == "flow"
  assert row["images_per_second"] > 0 and row["step_gflop"] > 0 and row["losses_finite"]
  assert row["images_per_second"] == pytest.approx(8 / row["step_seconds"])
  # On a CPU the peak is the matmul throughput measured in the same run.
  assert result["peak"]["source"] == "measured"
  assert row["mfu"] == pytest.approx(row["achieved_tflops"] / result["matmul_tflops"])
  assert 0 < row["mfu"] < 1.5
  text = "\n".join(lines)
  assert "peak used for MFU: the float32 matmul throughput" in text
  assert "images/s" in text and "GFLOP/step" in text and "MFU" in text
  assert "throughput_ratio" not in result  # no baseline asked for


def test_baseline_is_timed_in_the_same_run_and_its_ratio_printed(monkeypatch):
  seen = []

  def fake_time(config, *, steps, repeats, warmup):
    seen.append(config.model.mixer)
    seconds = 0.1 if config.model.mixer == "attention" else 0.05
    return {"batch": 8, "num_params": 1000, "tokens": 16, "compile_seconds": 0.0,
            "step_seconds": seconds, "window_step_seconds": [seconds],
            "images_per_second": 8 / seconds, "step_gflop": 2.0,
            "achieved_tflops": 2e-3 / seconds, "losses_finite": True}

  monkeypatch.setattr(bench, "time_train_step", fake_time)
  monkeypatch.setattr(bench, "matmul_tflops", lambda size, repeats=20: 0.1)
  lines = []
  result = bench.run_benchmark(size="tiny", patch=8, batch=8, steps=2, repeats=1,
                               print_fn=lines.append)
  assert seen == ["attention", "linear"]  # DiT, then LiT with the same settings
  assert result["rows"][1]["model"].startswith("LiT-tiny/8")
  assert result["throughput_ratio"] == pytest.approx(0.5)
  assert "DiT / baseline images/s = 0.50x" in lines[-1]


def test_gpu_peaks_are_chosen_by_device_kind_and_precision():
  name, peaks = bench.gpu_peak("NVIDIA H100 80GB HBM3")
  assert name == "H100 SXM" and peaks["bf16"] == 989.4 and peaks["fp32"] == 66.9
  assert bench.gpu_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
  assert bench.gpu_peak("NVIDIA A100-SXM4-80GB")[0] == "A100"
  assert bench.gpu_peak("cpu") is None
  # float32 matmuls under jax's default precision run on TF32 tensor cores.
  assert bench.matmul_precision() == "tf32"
  with jax.default_matmul_precision("highest"):
    assert bench.matmul_precision() == "fp32"
