"""What happens when things go wrong: one writer per workdir, checkpoints that are verified and
fall back, configs refused before any compute (one line, an exit code), changed settings on
resume, a full disk, a preempted or diverged run."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import paperzoo
from experiments import cli
from experiments.configs import dlinear
from paperzoo import checkpoint as checkpoint_lib
from paperzoo import config as config_lib
from paperzoo import metric_writers
from paperzoo import trainer
from paperzoo import workdir as workdir_lib
from tests.conftest import REPO_ROOT

NUM_STEPS = 8


def tiny(**train):
  """Eight steps of DLinear with a checkpoint after each (two kept), evaluated at the end."""
  config = dlinear.get_config("runlocal,pred_len=24")
  config.train.update(plots=False, num_steps=NUM_STEPS, checkpoint_every_steps=1,
                      keep_checkpoints=2, log_every_steps=1, eval_every_steps=NUM_STEPS)
  config.train.update(train)
  return config


def cli_run(workdir: pathlib.Path, *args: str, config: str = "dlinear.py:runlocal,pred_len=24"
            ) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
       f"--config=experiments/configs/{config}", "--config.train.plots=False", *args],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def files_of(directory: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(directory)): p.stat().st_mtime_ns
          for p in sorted(directory.rglob("*"))} if directory.exists() else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every interrupted one must end like."""
  return paperzoo.train_and_evaluate(tiny(), tmp_path_factory.mktemp("reference") / "run")


# ---------------------------------------------------------------------------------------------
# 1. One writer per workdir.

def test_a_second_process_on_a_workdir_is_refused_and_the_first_keeps_its_metrics(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config.train.num_steps=1000000", "--config.train.log_every_steps=50",
          "--config.train.eval_every_steps=1000000"]  # runs until it is stopped
  first = cli_run(workdir, *args)
  deadline = time.monotonic() + 240
  while not (workdir / "metrics.jsonl").exists():  # the first is training, lock held
    assert first.poll() is None, first.communicate()[1][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  second = cli_run(workdir, *args)
  _, err = second.communicate(timeout=240)
  assert second.returncode == cli.BUSY, err[-3000:]
  (line,) = err.strip().splitlines()  # one line, no traceback
  assert line.startswith(f"error: {workdir} is in use by pid {first.pid} on host ")
  assert first.poll() is None  # the first goes on, untouched
  first.send_signal(signal.SIGTERM)
  out, first_err = first.communicate(timeout=240)
  assert first.returncode == cli.PREEMPTED, first_err[-3000:]
  stopped = json.loads(out[out.index("{"):])["step"]
  train_steps = [r["step"] for r in metric_writers.read_metrics(workdir)
                 if r["split"] == "train"]
  # Every logged step up to where it stopped, in order, each once (the steps since the last
  # log are written when the preempted run saves).
  logged = list(range(50, stopped + 1, 50))
  assert train_steps in (logged, logged + [stopped]) and len(logged) > 1


def test_a_refused_process_touches_nothing_and_a_dead_holder_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}")
  held, release = threading.Event(), threading.Event()

  def holder():
    with workdir_lib.lock(workdir):
      held.set()
      release.wait(timeout=120)

  thread = threading.Thread(target=holder)
  thread.start()
  assert held.wait(timeout=60)
  before = files_of(tmp_path)
  try:
    process = cli_run(workdir)
    _, err = process.communicate(timeout=240)
    after = files_of(tmp_path)
  finally:
    release.set()
    thread.join()
  assert process.returncode == cli.BUSY
  assert f"is in use by pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1
  assert after == before  # nothing written, not even the lock file's holder

  # A process that holds the lock and dies: its lock is free, and the next one says whose it was.
  script = textwrap.dedent(f"""
      import time
      from paperzoo import workdir
      with workdir.lock({str(workdir)!r}):
        print("held", flush=True)
        time.sleep(600)
  """)
  dying = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, text=True)
  assert dying.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {dying.pid}"):
    with workdir_lib.lock(workdir):
      pass
  dying.send_signal(signal.SIGKILL)
  dying.wait()
  told = []
  with workdir_lib.lock(workdir, on_takeover=told.append):
    pass
  assert len(told) == 1 and f"pid {dying.pid}" in told[0] and "no longer running" in told[0]


# ---------------------------------------------------------------------------------------------
# 2. Verified checkpoints that fall back.

def _crash_at(step: int):
  """A MetricWriter.write that raises at training step `step`, as a crash there would."""
  original = metric_writers.MetricWriter.write

  def write(self, at, split, metrics):
    if split == "train" and at == step:
      raise RuntimeError(f"crash at step {step}")
    return original(self, at, split, metrics)
  return write


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_file(step_dir / "state")
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(step_dir):
  path = _largest_file(step_dir / "state")
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
  path.write_bytes(bytes(data))


def _flip_one_bit(step_dir):
  path = _largest_file(step_dir / "state")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _delete_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _damage_record(step_dir):
  path = _largest_file(step_dir / "record")
  path.write_text(path.read_text()[:-5])


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
  """A run that crashed at step 6, after its checkpoints of steps 4 and 5."""
  workdir = tmp_path_factory.mktemp("crashed") / "run"
  with pytest.MonkeyPatch.context() as patched:
    patched.setattr(metric_writers.MetricWriter, "write", _crash_at(6))
    with pytest.raises(RuntimeError, match="crash at step 6"):
      paperzoo.train_and_evaluate(tiny(), workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [4, 5]
  assert (workdir / "checkpoints" / "5" / checkpoint_lib.DIGEST_FILE).exists()
  return workdir


@pytest.mark.parametrize("damage", [_truncate, _garble, _flip_one_bit, _delete_state,
                                    _damage_record], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    damage, reference, crashed, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(crashed, workdir)
  damage(workdir / "checkpoints" / "5")
  capsys.readouterr()

  resumed = paperzoo.train_and_evaluate(tiny(), workdir)
  out = capsys.readouterr().out
  (warning,) = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
  assert f"{workdir / 'checkpoints' / '5'} " in warning
  assert f"moved to {workdir / checkpoint_lib.SET_ASIDE_DIR / 'checkpoints-5'}" in warning
  assert f"resumed from {workdir}/checkpoints/4" in out
  assert (workdir / checkpoint_lib.SET_ASIDE_DIR / "checkpoints-5").is_dir()  # kept
  for key in ("test", "val", "best_step", "steps"):
    assert resumed[key] == reference[key], key
  assert [r for r in metric_writers.read_metrics(workdir) if r["split"] == "train"][-1][
      "step"] == NUM_STEPS


def test_a_checkpoint_digest_is_written_once_complete_and_survives_later_saves(tmp_path):
  paperzoo.train_and_evaluate(tiny(), tmp_path)
  for step_dir in [*(tmp_path / "checkpoints").iterdir(), *(tmp_path / "best").iterdir()]:
    if step_dir.name.isdigit():
      assert checkpoint_lib._digest_problem(step_dir) is None  # pylint: disable=protected-access
      assert (step_dir / checkpoint_lib.DIGEST_FILE).exists(), step_dir


# ---------------------------------------------------------------------------------------------
# 3. Configs checked before any compute.

@pytest.mark.parametrize("override, says", [
    ("--config.optimizer.learning_rate=-0.001", "optimizer.learning_rate=-0.001: must be > 0"),
    ("--config.model.no_such_key=1", "unknown key model.no_such_key; keys of config.model:"),
])
def test_a_bad_config_is_one_line_and_an_exit_code_and_writes_nothing(override, says,
                                                                      tmp_path):
  process = cli_run(tmp_path / "run", override)
  _, err = process.communicate(timeout=240)
  assert process.returncode == cli.CONFIG, err[-3000:]
  (line,) = err.strip().splitlines()
  assert line.startswith("error: ") and says in line
  assert list(tmp_path.iterdir()) == []  # no workdir, no lock file


@pytest.mark.parametrize("key, value, says", [
    ("train.batch_size", 0, "train.batch_size=0"),
    ("train.num_epochs", -1, "train.num_epochs=-1"),
    ("model.moving_avg", 0, "model.moving_avg=0"),
])
def test_a_bad_value_is_refused_before_any_compute(key, value, says, tmp_path):
  config = tiny()
  config.update_from_flattened_dict({key: value})
  with pytest.raises(config_lib.ConfigError) as error:
    paperzoo.train_and_evaluate(config, tmp_path / "run")
  assert says in str(error.value) and len(str(error.value).splitlines()) == 1
  assert cli.exit_code(error.value) == cli.CONFIG
  assert list(tmp_path.iterdir()) == []


def test_verbose_shows_the_traceback(tmp_path):
  process = cli_run(tmp_path / "run", "--config.train.batch_size=0", "--verbose")
  _, err = process.communicate(timeout=240)
  assert process.returncode != 0 and "Traceback" in err and "train.batch_size=0" in err


# ---------------------------------------------------------------------------------------------
# 4. Changed settings on resume.

def test_resuming_with_another_learning_rate_is_refused_unless_allowed_then_recorded(
    tmp_path, monkeypatch):
  with monkeypatch.context() as patched:
    patched.setattr(metric_writers.MetricWriter, "write", _crash_at(4))
    with pytest.raises(RuntimeError):
      paperzoo.train_and_evaluate(tiny(), tmp_path)
  changed = tiny()
  changed.optimizer.learning_rate *= 2
  with pytest.raises(trainer.ChangedConfigError,
                     match=r"other settings \(optimizer.learning_rate: .* -> .*\).*"
                           "--allow_config_change"):
    paperzoo.train_and_evaluate(changed, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == (
      tiny().optimizer.learning_rate)  # the record of what the first steps used is kept
  paperzoo.train_and_evaluate(changed, tmp_path, allow_config_change=True)
  history = [json.loads(line) for line in
             (tmp_path / trainer.CONFIG_HISTORY_FILE).read_text().splitlines()]
  assert [h["step"] for h in history] == [0, 3]
  assert history[1]["changed"] == ["optimizer.learning_rate"]
  assert (history[0]["config"]["optimizer"]["learning_rate"] * 2
          == history[1]["config"]["optimizer"]["learning_rate"])


# ---------------------------------------------------------------------------------------------
# 5. A full disk, a preempted run, a diverged one.

def test_a_full_disk_is_one_error_and_no_checkpoint_is_lost(reference, tmp_path, monkeypatch):
  original = metric_writers.MetricWriter.write

  def full_at_step_6(self, step, split, metrics):
    if split == "train" and step == 6:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, split, metrics)

  with monkeypatch.context() as patched:
    patched.setattr(metric_writers.MetricWriter, "write", full_at_step_6)
    with pytest.raises(trainer.DiskFullError) as error:
      paperzoo.train_and_evaluate(tiny(), tmp_path)
  assert len(str(error.value).splitlines()) == 1 and "no space left on device" in str(
      error.value)
  assert cli.exit_code(error.value) == cli.DISK_FULL
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["4", "5"]
  resumed = paperzoo.train_and_evaluate(tiny(), tmp_path)
  assert resumed["test"] == reference["test"]


def test_exit_codes_of_user_errors():
  assert cli.exit_code(config_lib.ConfigError("x")) == cli.CONFIG
  assert cli.exit_code(workdir_lib.MissingRunError("x")) == cli.MISSING
  assert cli.exit_code(workdir_lib.WorkdirBusyError("x")) == cli.BUSY
  assert cli.exit_code(trainer.ChangedConfigError("x")) == cli.OTHER_RUN
  assert cli.exit_code(trainer.NonFiniteLossError("x")) == cli.NOT_FINITE
  assert cli.exit_code(RuntimeError("a bug")) is None
  assert len({cli.DONE, cli.ERROR, cli.CONFIG, cli.MISSING, cli.BUSY, cli.DISK_FULL,
              cli.OTHER_RUN, cli.NOT_FINITE, cli.PREEMPTED}) == 9
