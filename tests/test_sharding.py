"""The same config trains identically on 1 device and on meshes of 8 fake CPU devices.

Fake devices must be configured before jax starts, so the 8-device runs happen in their own
Python process; this process keeps its single CPU device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import paperzoo
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
