"""The same config trains identically on 1 device and on meshes of 8 fake CPU devices.

Fake devices must be configured before jax starts, so the 8-device runs happen in their own
Python process; this process keeps its single CPU device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import paperzoo
from paperzoo import metric_writers
from paperzoo import sharding
from experiments.configs import quickstart
from tests.conftest import REPO_ROOT
from tests.test_trainer import train_losses

MESHES = {"data8": (-1, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


def small_config(mesh=(-1, 1, 1)):
  """iTransformer (dropout on) on the synthetic series: every parameter kind gets sharded."""
  config = quickstart.get_config("runlocal")
  config.model.update(d_model=16, d_ff=32, num_heads=2)
  config.train.update(num_steps=6, batch_size=16, eval_batch_size=64, plots=False)
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


_CHILD = """
import json
import sys
import jax
assert len(jax.devices()) == 8, jax.devices()
import paperzoo
from tests.test_sharding import small_config, MESHES
for name, mesh in MESHES.items():
  paperzoo.train_and_evaluate(small_config(mesh), f"{sys.argv[1]}/{name}")
# The single-device run's checkpoints, restored onto this 8-device mesh and scored again.
resharded = paperzoo.train_and_evaluate(small_config((2, 2, 2)), f"{sys.argv[1]}/single")
assert resharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}, resharded["mesh"]
print("RESHARDED", json.dumps(resharded["test"]))
"""


@pytest.mark.multidevice
def test_loss_curves_agree_on_1_and_8_devices_and_checkpoints_move_between_meshes(tmp_path):
  assert len(jax.devices()) == 1
  single = paperzoo.train_and_evaluate(small_config(), tmp_path / "single")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert child.returncode == 0, child.stderr[-4000:]
  reference = train_losses(tmp_path / "single")
  assert len(reference) == 6
  for name in MESHES:
    np.testing.assert_allclose(train_losses(tmp_path / name), reference, rtol=2e-5,
                               err_msg=name)
    results = (tmp_path / name / "results.json").read_text()
    assert '"fsdp"' in results
  resharded = json.loads(child.stdout.split("RESHARDED ")[1].splitlines()[0])
  for metric, value in single["test"].items():
    assert resharded[metric] == pytest.approx(value, rel=1e-5), metric


# One process of a two-process run (jax.distributed over localhost, gloo collectives on CPU),
# two fake devices each: the mesh spans four devices in two processes, as on two hosts.
_PROCESS = """
import json
import os
import signal
import sys
import threading
import time
import jax
import numpy as np
from jax.experimental import multihost_utils
try:  # cross-process collectives on CPU
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
except (AttributeError, KeyError, ValueError):  # a jax without the option
  pass
port, process_id, workdir, num_steps, preempt = sys.argv[1:]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
assert jax.device_count() == 4 and jax.local_device_count() == 2
import paperzoo
from paperzoo import sharding
from tests.test_sharding import small_config

if preempt == "1" and process_id == "1":  # a preemption notice reaches the second process only
  def notice():
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=notice, daemon=True).start()
# Each device gets its own rows of the one global batch, not a copy of the whole.
batch = {"x": np.arange(8.0)}
placed = sharding.shard_batch(batch, sharding.batch_sharding(sharding.make_mesh(
    small_config().mesh), small_config().sharding_rules))
assert placed["x"].shape == (8,), placed["x"].shape
np.testing.assert_array_equal(multihost_utils.process_allgather(placed["x"], tiled=True),
                              batch["x"])
config = small_config()
config.train.update(num_steps=int(num_steps), plots=True, log_every_steps=1)
print("RESULT", json.dumps(paperzoo.train_and_evaluate(config, workdir)), flush=True)
"""


def _run_two_processes(workdir, *, num_steps: int, preempt: bool = False) -> list[dict]:
  """Runs `_PROCESS` as processes 0 and 1 of one run; returns what each one's
  train_and_evaluate returned."""
  with socket.socket() as probe:  # a free port for jax's coordination service
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  processes = [subprocess.Popen(
      [sys.executable, "-c", _PROCESS, str(port), str(i), str(workdir), str(num_steps),
       str(int(preempt))], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in processes]
  finally:  # one process failing leaves the other waiting at a barrier
    for process in processes:
      process.kill()
  for i, (process, (_, stderr)) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, f"process {i}: {stderr[-4000:]}"
  return [json.loads(stdout.split("RESULT ")[1].splitlines()[0]) for stdout, _ in outputs]


@pytest.mark.multidevice
def test_two_processes_train_like_one_and_write_each_file_once(tmp_path):
  """A run over two processes (as on two hosts) feeds each device its own rows of the one
  global batch, so its loss curve is the single-device one; the first process alone writes
  the metrics, results and pictures; the checkpoint managers do not block each other."""
  single = paperzoo.train_and_evaluate(small_config(), tmp_path / "single")
  results = _run_two_processes(tmp_path / "multi", num_steps=6)
  assert results[0]["test"] == results[1]["test"]
  assert results[0]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  np.testing.assert_allclose(train_losses(tmp_path / "multi"), train_losses(tmp_path / "single"),
                             rtol=2e-5)  # each step once: no record written twice
  for metric, value in single["test"].items():
    assert results[0]["test"][metric] == pytest.approx(value, rel=1e-5), metric
  assert len(list((tmp_path / "multi" / "tensorboard").iterdir())) == 1
  for name in ("results.json", "config.json", "loss_curves.png", "forecasts.png"):
    assert (tmp_path / "multi" / name).is_file(), name


@pytest.mark.slow  # two processes train, stop and resume: over a minute of CPU
@pytest.mark.multidevice
def test_two_processes_stop_together_on_a_preemption_notice_and_resume(tmp_path):
  """SIGTERM to one process of two: both save at the same step and return "preempted", and a
  second launch resumes from that checkpoint to the end."""
  workdir = tmp_path / "multi"
  first = _run_two_processes(workdir, num_steps=100, preempt=True)
  print("preempted:", first)
  assert first[0] == first[1], first  # {"status": "preempted", "step": the same step}
  assert first[0]["status"] == "preempted" and 0 < first[0]["step"] < 100, first
  second = _run_two_processes(workdir, num_steps=100)
  assert second[0]["status"] == "done" and second[0]["steps"] == 100
  steps = [r["step"] for r in metric_writers.read_metrics(workdir) if r["split"] == "train"]
  assert steps == list(range(1, 101))


def test_mesh_sizes_are_checked():
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
  with pytest.raises(ValueError, match="needs 4 devices, but 1 are available"):
    sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1})


def test_logical_rules_map_names_to_mesh_axes():
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
  spec = sharding.logical_to_mesh_spec(("embed", "mlp", "time", None), rules)
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None, None)
