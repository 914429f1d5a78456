"""Every version-sensitive Pallas import, in one place (jax 0.10.2 to 0.12).

The kernels in this package import Pallas only through this module, so that a
renamed or moved symbol upstream is fixed here once.

here                       | jax 0.10.2     | jax 0.11 / 0.12   | before 0.7
-------------------------- | -------------- | ----------------- | --------------------
pl                         | P              | same              | same
pltpu                      | P.tpu          | same              | same
pl_triton                  | P.triton       | deprecated        | P.gpu < 0.6.1
plgpu                      | P.mosaic_gpu   | same              | same
triton_compiler_params     | CompilerParams | same              | TritonCompilerParams
tpu_compiler_params        | CompilerParams | same              | TPUCompilerParams
tpu_interpret_params       | InterpretParams| same              | TPUInterpretParams *
reset_tpu_interpret_state  | reset_tpu_i... | same              | absent: no-op *
mosaic_gpu_compiler_params | CompilerParams | same              | GPUCompilerParams
triton_debug_barrier       | P.triton       | same              | same
SQUEEZED                   | P.squeezed     | same              | None

P = `jax.experimental.pallas`; a module this jax lacks is None here, and
`CompilerParams` is the class in the row's module. Rows marked * fall back
gracefully: without a TPU interpreter class, `tpu_interpret_params()` returns
`True` (the generic interpreter); `reset_tpu_i...` is
`P.tpu.reset_tpu_interpret_mode_state`. This package's tests run on 0.10.2
only; the other columns come from the upstream changelog.

Facts the table relies on (Pallas changelog): since 0.9.0 Mosaic GPU is the
default GPU lowering, and the Triton lowering is selected by passing a Triton
`CompilerParams` to `pallas_call` (the `backend=` argument is gone since 0.9.1);
`pl.load`/`pl.store` are gone since 0.9.0 (index refs directly, which every
version here supports); `pl.dot` moved to the Triton module in 0.10.2, so the
kernels call `jax.lax.dot_general`, which every lowering accepts.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
from jax.experimental import pallas as pl

JAX_VERSION: tuple[int, ...] = tuple(
    int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def _optional_module(name: str) -> ModuleType | None:
  """Imports `name`, or returns None when this jax build lacks it."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


pltpu = _optional_module("jax.experimental.pallas.tpu")
# The Triton module was `pallas.gpu` before 0.6.1; it is deprecated upstream
# since 0.11 and may be removed, so its absence must not break the import.
pl_triton = (_optional_module("jax.experimental.pallas.triton")
             or _optional_module("jax.experimental.pallas.gpu"))
plgpu = _optional_module("jax.experimental.pallas.mosaic_gpu")

# A squeezed block dimension: `pl.squeezed` where it exists (0.6+), `None`
# (its older spelling, still accepted in 0.10.2) otherwise.
SQUEEZED: Any = getattr(pl, "squeezed", None)

HAS_TRITON = pl_triton is not None
HAS_TPU = pltpu is not None
HAS_MOSAIC_GPU = plgpu is not None


def _first_attr(module: ModuleType | None, names: tuple[str, ...],
                what: str) -> Any:
  if module is None:
    raise NotImplementedError(
        f"{what}: this jax ({jax.__version__}) has no such Pallas module.")
  for name in names:
    if hasattr(module, name):
      return getattr(module, name)
  raise NotImplementedError(
      f"{what}: none of {names} in {module.__name__} (jax {jax.__version__}).")


def triton_compiler_params(num_warps: int | None = None,
                           num_stages: int | None = None) -> Any:
  """Compiler params that select (and tune) the Triton lowering on GPU."""
  cls = _first_attr(pl_triton, ("CompilerParams", "TritonCompilerParams"),
                    "Triton compiler params")
  return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(**kwargs: Any) -> Any:
  """Mosaic TPU compiler params (e.g. `dimension_semantics=(...)`)."""
  cls = _first_attr(pltpu, ("CompilerParams", "TPUCompilerParams"),
                    "Mosaic TPU compiler params")
  return cls(**kwargs)


def tpu_interpret_params(**kwargs: Any) -> Any:
  """The `interpret=` value that runs a Mosaic TPU kernel on CPU.

  `pltpu.InterpretParams` (TPU interpret mode: simulated HBM/VMEM, the
  grid's DMAs, TPU grid semantics, uninitialised memory filled with NaN,
  out-of-bounds reads raise; `TPUInterpretParams` in jax 0.5-0.7). On a jax
  without it, `True`: the generic interpreter, which runs the same kernel
  body without the TPU memory model (scratch shapes and
  `PrefetchScalarGridSpec` still work there).
  """
  cls = None
  if pltpu is not None:
    cls = (getattr(pltpu, "InterpretParams", None)
           or getattr(pltpu, "TPUInterpretParams", None))
  return True if cls is None else cls(**kwargs)


def reset_tpu_interpret_state() -> None:
  """Clears TPU interpret mode's global state (needed after a kernel raised
  inside the interpreter); a no-op where this jax has no such state."""
  reset = getattr(pltpu, "reset_tpu_interpret_mode_state", None)
  if reset is not None:
    reset()


def mosaic_gpu_compiler_params(**kwargs: Any) -> Any:
  """Mosaic GPU compiler params (e.g. `approx_math=True`)."""
  cls = _first_attr(plgpu, ("CompilerParams", "GPUCompilerParams"),
                    "Mosaic GPU compiler params")
  return cls(**kwargs)


def triton_debug_barrier() -> None:
  """A block-wide barrier inside a Triton-lowered kernel.

  Needed where one program writes a buffer and then reads it back in a
  different thread-to-element layout. Call it only in kernels lowered through
  Triton: interpret mode runs a program sequentially and has no rule for it.
  """
  _first_attr(pl_triton, ("debug_barrier",), "Triton debug_barrier")()


def default_backend() -> str:
  """'gpu', 'tpu' or 'cpu': the platform of the default device."""
  platform = jax.default_backend()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


__all__ = [
    "JAX_VERSION", "SQUEEZED", "pl", "pltpu", "pl_triton", "plgpu",
    "HAS_TRITON", "HAS_TPU", "HAS_MOSAIC_GPU", "triton_compiler_params",
    "tpu_compiler_params", "tpu_interpret_params",
    "reset_tpu_interpret_state", "mosaic_gpu_compiler_params",
    "triton_debug_barrier", "default_backend",
]
