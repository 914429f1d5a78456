"""The device check (experiments/benchmarks/device_check.py) rehearsed on CPU with --tiny: every
section runs end to end through interpret mode, the correctness rows pass, the results carry
the device, versions, date, command and the "not a device measurement" note, and never land
on the committed device results; a spent budget or SIGTERM still leaves a results file.

The DiT section's training step is faked here: compiling it is most of a cold run's time, and
tests/test_dit_throughput.py runs the same tiny step for real."""

from __future__ import annotations

import json
import pathlib

import pytest

from experiments.benchmarks import device_check
from experiments.benchmarks import dit_throughput

KERNELS = {"flash_attention", "block_sparse_attention", "selective_scan",
           "chunked_linear_attention", "decode_attention"}


def _committed_files():
  return {path: path.stat().st_mtime_ns
          for path in device_check.COMMITTED_RESULTS_DIR.glob(f"{device_check.RESULTS_NAME}.*")}


def _read(directory: pathlib.Path):
  stem = directory / device_check.RESULTS_NAME
  return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def _fake_train_step(config, *, steps, repeats, warmup):
  del steps, repeats, warmup
  return {"batch": int(config.train.batch_size), "num_params": 1000, "tokens": 16,
          "compile_seconds": 0.0, "step_seconds": 0.01, "window_step_seconds": [0.01],
          "images_per_second": config.train.batch_size / 0.01, "step_gflop": 0.01,
          "achieved_tflops": 1e-3, "losses_finite": True}


def test_tiny_run_covers_every_section_and_writes_labelled_results(tmp_path, monkeypatch):
  monkeypatch.setattr(dit_throughput, "time_train_step", _fake_train_step)
  before = _committed_files()
  out = tmp_path / "out"
  monkeypatch.setenv("OUT", str(out))
  code = device_check.main(["--tiny", f"--results_dir={tmp_path / 'results'}",
                            f"--out_dir={out}"])
  assert _committed_files() == before  # the committed device results are untouched
  results, markdown = _read(tmp_path / "results")
  assert _read(out) == (results, markdown)  # the copy that comes back from the device
  assert code == 0, results["sections"]
  assert {name: s["status"] for name, s in results["sections"].items()} == {
      name: "done" for name in device_check.SECTIONS}

  rows = results["rows"]
  checks = [row for row in rows if row["section"] == "correctness"]
  assert {row["kernel"] for row in checks} == KERNELS
  assert all(row["passed"] and row["impl"] == "interpret" for row in checks)
  quantities = {(row["kernel"], row["quantity"]) for row in checks}
  assert {("flash_attention", "dv"), ("block_sparse_attention", "dq"),
          ("selective_scan", "dA"), ("chunked_linear_attention", "dlog_decay"),
          ("decode_attention", "out")} <= quantities
  for section in ("block_sparse", "flash", "decode", "scan", "linear"):
    timed = [row for row in rows if row["section"] == section]
    assert timed and all(row["seconds"] > 0 for row in timed), (section, timed)
    assert any(row["ratios"] for row in timed), section  # against a baseline of this run
  sparse = [row for row in rows if row["section"] == "block_sparse" and "density" in row]
  assert set(sparse[0]["ratios"]) == {"dense xla", "dense interpret"}
  (dit,) = [row for row in rows if row["section"] == "dit"]
  assert dit["model"] == "DiT-tiny/8 (1 x 16, 2 heads)" and dit["images_per_second"] == 800

  note = "interpret mode on CPU, not a device measurement"
  assert results["note"] == note and results["tiny"]
  assert results["device"] == "cpu" and results["jax_version"] and results["date"]
  command = (f"python -m experiments.benchmarks.device_check --tiny "
             f"--results_dir={tmp_path / 'results'} --out_dir=$OUT")
  assert results["command"] == command
  for text in (note, f"jax {results['jax_version']}", f"Date: {results['date']}",
               f"Command: `{command}`", "## Correctness", "## Block-sparse attention",
               "## Flash attention", "## Decode attention", "## Selective scan",
               "## Chunked linear attention", "## DiT training step"):
    assert text in markdown, text


def test_cases_that_do_not_fit_the_budget_are_skipped_and_said_so(tmp_path):
  code = device_check.main(["--tiny", f"--results_dir={tmp_path}", "--budget_s=0.01",
                            "--sections=flash,dit"])
  assert code == 1
  results, markdown = _read(tmp_path)
  assert results["sections"]["flash"]["status"] == "partial: 1 case(s) skipped for the budget"
  assert results["sections"]["correctness"]["status"] == "not asked for (--sections)"
  skipped = [row for row in results["rows"] if "skipped" in row]
  assert {row["section"] for row in skipped} == {"flash", "dit"}
  assert "of the budget left" in skipped[0]["skipped"] and "of the budget left" in markdown


def test_sigterm_keeps_what_was_measured(tmp_path, monkeypatch):
  def stopped(self):
    self.add({"section": "scan", "case": "measured before the signal", "impl": "x",
              "direction": "fwd", "seconds": 1.0, "ratios": {}})
    raise device_check.Stopped()

  monkeypatch.setattr(device_check.DeviceCheck, "scan_timings", stopped)
  code = device_check.main(["--tiny", f"--results_dir={tmp_path}", "--sections=scan,dit"])
  assert code == 1
  results, markdown = _read(tmp_path)
  assert results["stopped"] and results["sections"]["scan"]["status"] == "stopped by SIGTERM"
  assert results["sections"]["dit"]["status"] == "not run (stopped by SIGTERM)"
  assert "measured before the signal" in markdown and "stopped by SIGTERM" in markdown


def test_refuses_to_overwrite_committed_results_or_to_run_full_size_on_cpu(tmp_path, capsys):
  committed = device_check.COMMITTED_RESULTS_DIR
  for argv in (["--tiny"], ["--tiny", f"--results_dir={committed}"],
               ["--tiny", f"--out_dir={tmp_path}", f"--results_dir={committed}"], [],
               ["--tiny", f"--out_dir={tmp_path}", "--sections=flash,nope"]):
    with pytest.raises(SystemExit):
      device_check.main(argv)
  errors = capsys.readouterr().err
  assert "must not go to experiments/results" in errors
  assert "needs a GPU (jax sees cpu)" in errors and "unknown ['nope']" in errors
