"""The device mesh and the mapping from logical axis names to mesh axes.

Layers name the axes of their weights (`embed`, `mlp`, `heads`, ...; see `paperzoo.layers`), and
`config.sharding_rules` maps those names to the mesh axes `data`, `fsdp` and `tensor`. The same
model code then runs replicated on one device, data-parallel on eight, or with sharded weights,
by changing the config alone.

Mesh axes are `AxisType.Auto` (GSPMD-style propagation): XLA chooses the shardings of
intermediates from those of the inputs and parameters. jax's newer default, Explicit axes,
demands an `out_sharding` on every matmul that contracts a sharded dimension, which would leak
sharding decisions into every layer.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Every weight axis carries one of these logical names (None: never sharded, e.g. a kernel's
# spatial axes); `config.sharding_rules` maps some of them to mesh axes.
LOGICAL_AXIS_NAMES = ("embed", "mlp", "heads", "head_dim", "time", "variates", "vocab", None)
# The mesh axes a batch is split over (its leading dimension).
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh from `config.mesh`; -1 takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {', '.join(MESH_AXES)}")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  if free:
    if len(devices) % fixed:
      raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {fixed}")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"but {len(devices)} are available")
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return jax.sharding.Mesh(
      np.asarray(devices).reshape(shape), MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]]
                         ) -> PartitionSpec:
  """Maps a tuple of logical axis names to a PartitionSpec; unknown names are replicated."""
  table = dict(rules)
  return PartitionSpec(*(table.get(name) if name is not None else None for name in names))


def check_logical_names(params: Any) -> None:
  """Fails unless every parameter names each of its axes from `LOGICAL_AXIS_NAMES`.

  `params` holds nnx Params (e.g. `nnx.split(model, nnx.Param, ...)[1]`, abstract or real). An
  unnamed or misspelled axis would be replicated without a word, so a model meant to shard
  would silently not; the trainer calls this before any compute.
  """
  bad = []
  for path, param in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = param.get_metadata().get("out_sharding")
    where = jax.tree_util.keystr(path)
    if names is None:
      bad.append(f"{where} {tuple(param.shape)} has no logical axis names")
    elif len(names) != len(param.shape):
      bad.append(f"{where} {tuple(param.shape)} names {len(names)} axes: {tuple(names)}")
    elif not set(names) <= set(LOGICAL_AXIS_NAMES):
      bad.append(f"{where} uses unknown names {sorted(set(names) - set(LOGICAL_AXIS_NAMES))}")
  if bad:
    raise ValueError(
        "every parameter must name its axes (wrap the initializer in nnx.with_partitioning, "
        "as paperzoo.layers.dense does) from " + ", ".join(map(str, LOGICAL_AXIS_NAMES))
        + ": " + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a train-state pytree whose Variables carry logical axis names.

  Optimizer states built by `jax.tree.map` over the parameters keep the parameters' Variable
  metadata, so moments are sharded like their parameters; plain arrays (step counters) are
  replicated.
  """
  logical_specs = nnx.get_partition_spec(abstract_state)  # specs of logical names
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), rules)),
      logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """The sharding of every input array: leading (batch) axis split by the `batch` rule."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch",), rules))


def batch_shards(sharding: NamedSharding | None) -> int:
  """How many pieces `sharding` (a `batch_sharding`, or None: one device) cuts the batch axis
  into; batch sizes must be multiples of it."""
  axes = sharding.spec[0] if sharding is not None and len(sharding.spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[axis] for axis in axes)


def is_primary_process() -> bool:
  """Whether this process writes the run's files (config, metrics, results, pictures): the
  only process, or the first of a multi-process run. Every process still computes, since a
  computation on the mesh needs all of them."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Waits until every process of a multi-process run has got here (a no-op for one process):
  for file operations one process makes that the others then rely on."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_value(value: bool) -> bool:
  """The first process's `value`, on every process of a multi-process run (a decision only the
  first one can make, such as whether it got the workdir's lock)."""
  if jax.process_count() == 1:
    return value
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places a global batch on the mesh.

  Every process passes the same whole batch (the trainer's data order is a pure function of
  the seed and the step), and each transfers only the rows its own devices hold.
  """
  if jax.process_count() == 1:
    # One batched transfer for all arrays: several times cheaper per step than one call per
    # array, which matters for small models whose steps take a few milliseconds.
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch)
