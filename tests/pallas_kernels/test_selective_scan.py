"""selective_scan: Pallas kernels (interpret mode) against the references.

Tolerances, relative to the largest magnitude of the reference array:
float32 outputs and last state 1e-5, gradients 1e-4; bfloat16 inputs
(reference in float32 on the same inputs) outputs 2e-2, gradients 5e-2.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selective_scan
from pallas_kernels.selective_scan import (ScanBlocks, _auto_impl, reference_scan,
                                           sequential_scan)

SMALL = ScanBlocks(block_d=4, chunk=8)
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 5e-2)}


def make_inputs(batch, length, channels, state, groups, *, with_d, with_z,
                with_bias, dtype=jnp.float32, seed=0):
  """Mamba-like inputs; groups=None gives B, C as [batch, length, state]."""
  # numpy's generator: eager jax.random compiles per shape, seconds each.
  rng = np.random.default_rng(seed)

  def normal(shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype)

  seq = (batch, length, channels)
  bc_shape = ((batch, length, state) if groups is None
              else (batch, length, groups, state))
  return dict(
      u=normal(seq, dtype=dtype),
      # Positive, like Mamba's softplus output (with delta_softplus the bias
      # and softplus still see both signs).
      delta=jnp.asarray(np.abs(0.5 * rng.standard_normal(seq, np.float32)),
                        dtype),
      A=jnp.asarray(-np.exp(0.5 * rng.standard_normal((channels, state),
                                                      np.float32))),
      B=normal(bc_shape, dtype=dtype),
      C=normal(bc_shape, dtype=dtype),
      D=normal((channels,)) if with_d else None,
      z=normal(seq, dtype=dtype) if with_z else None,
      delta_bias=normal((channels,), 0.3) if with_bias else None)


def _grouped(inputs):
  """B, C as [batch, length, groups, state], the references' form."""
  out = dict(inputs)
  if out["B"].ndim == 3:
    out["B"], out["C"] = out["B"][:, :, None], out["C"][:, :, None]
  return out


def numpy_recurrence(inputs, delta_softplus):
  """The definition, step by step in numpy float64."""
  x = {name: None if value is None else np.asarray(value, np.float64)
       for name, value in _grouped(inputs).items()}
  batch, length, channels = x["u"].shape
  groups = x["B"].shape[2]
  dt = x["delta"] + (0 if x["delta_bias"] is None else x["delta_bias"])
  if delta_softplus:
    dt = np.log1p(np.exp(dt))
  h = np.zeros((batch, channels, x["A"].shape[1]))
  ys = []
  group_of = np.arange(channels) // (channels // groups)
  for t in range(length):
    B_t, C_t = x["B"][:, t, group_of], x["C"][:, t, group_of]  # [b, d, n]
    h = np.exp(dt[:, t, :, None] * x["A"]) * h + (
        dt[:, t] * x["u"][:, t])[..., None] * B_t
    y = np.sum(h * C_t, axis=-1)
    if x["D"] is not None:
      y = y + x["D"] * x["u"][:, t]
    if x["z"] is not None:
      y = y * x["z"][:, t] / (1 + np.exp(-x["z"][:, t]))
    ys.append(y)
  return np.stack(ys, axis=1), h


@pytest.mark.parametrize("groups,with_z,softplus", [
    (None, False, False), (2, True, True)])
def test_references_are_the_recurrence(fast_jit, groups, with_z, softplus):
  inputs = make_inputs(2, 9, 6, 3, groups, with_d=True, with_z=with_z,
                       with_bias=True)
  want_y, want_h = numpy_recurrence(inputs, softplus)
  for scan in (reference_scan, sequential_scan):
    y, h = fast_jit(lambda x: scan(**_grouped(x), delta_softplus=softplus))(
        inputs)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), want_h, rtol=1e-4, atol=1e-5)


# (batch, length, channels, state, groups), D, z, delta_bias, softplus, tiles
CASES = [
    # state not a power of 2, several chunks and channel blocks
    ((2, 19, 12, 5, None), True, True, True, True, SMALL),
    # groups with two channel blocks each, no optional inputs
    ((1, 21, 16, 4, 2), False, False, False, False, SMALL),
    ((2, 1, 6, 3, 2), True, True, True, True, SMALL),        # length 1
    # 5 channels per group padded to a block of 8; one chunk (default tiles)
    ((1, 3, 10, 4, 2), True, False, True, False, ScanBlocks()),
]


def _value_and_grads(impl, softplus, blocks):
  def loss(inputs):
    y, last = selective_scan(**inputs, delta_softplus=softplus,
                             return_last_state=True, impl=impl, blocks=blocks)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return (jnp.sum(y.astype(jnp.float32) * weights)
            + jnp.sum(jnp.sin(last))), (y, last)

  return jax.value_and_grad(loss, has_aux=True)


def _check(fast_jit, close, case, dtype, impl="interpret"):
  shape, with_d, with_z, with_bias, softplus, blocks = case
  inputs = make_inputs(*shape, with_d=with_d, with_z=with_z,
                       with_bias=with_bias, dtype=dtype)

  def both(inputs):
    return [_value_and_grads(name, softplus, blocks)(inputs)
            for name in (impl, "reference")]

  ((_, (y, last)), grads), ((_, (ref_y, ref_last)), ref_grads) = fast_jit(
      both)(inputs)
  out_tol, grad_tol = TOL[dtype]
  chex.assert_shape([y, last],
                    [inputs["u"].shape, (shape[0], shape[2], shape[3])])
  chex.assert_type(y, dtype)
  close(dict(y=y, last_state=last), dict(y=ref_y, last_state=ref_last),
        atol=out_tol)
  # A gradient for every given input (None for those left out), in its dtype.
  chex.assert_trees_all_equal_dtypes(grads, inputs)
  close(grads, ref_grads, atol=grad_tol)


@pytest.mark.parametrize("case", CASES)
def test_interpret_matches_reference_f32(fast_jit, close, case):
  _check(fast_jit, close, case, jnp.float32)


def test_interpret_matches_reference_bf16(fast_jit, close):
  _check(fast_jit, close, CASES[0], jnp.bfloat16)


@pytest.mark.parametrize("case", CASES[:3])
def test_sequential_matches_reference_f32(fast_jit, close, case):
  # The CPU default: fused steps under jax.checkpoint; its gradients come from
  # autodiff through the rematerialized scan, not from the associative scan's.
  _check(fast_jit, close, case, jnp.float32, impl="sequential")


def test_last_state_only_when_asked(fast_jit):
  inputs = make_inputs(1, 4, 4, 2, None, with_d=False, with_z=False,
                       with_bias=False)
  y = fast_jit(lambda x: selective_scan(**x, impl="interpret",
                                        blocks=SMALL))(inputs)
  assert isinstance(y, jax.Array) and y.shape == (1, 4, 4)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_kernel_matches_reference(close):
  inputs = make_inputs(2, 300, 64, 16, 2, with_d=True, with_z=True,
                       with_bias=True)
  results = [jax.jit(_value_and_grads(impl, True, ScanBlocks()))(inputs)
             for impl in ("pallas", "reference")]
  ((_, (y, last)), grads), ((_, (ref_y, ref_last)), ref_grads) = results
  close(dict(y=y, last_state=last), dict(y=ref_y, last_state=ref_last),
        atol=1e-4)
  close(grads, ref_grads, atol=1e-3)


@pytest.mark.parametrize("change,message", [
    (dict(u=jnp.zeros((2, 4))), "u must be"),
    (dict(delta=jnp.zeros((1, 4, 5))), "delta must have u's shape"),
    (dict(A=jnp.zeros((5, 3))), "A must be"),
    (dict(B=jnp.zeros((1, 4, 3, 3)), C=jnp.zeros((1, 4, 3, 3))),
     "multiple of groups"),
    (dict(C=jnp.zeros((1, 4, 2))), "same shape"),
    (dict(B=jnp.zeros((1, 4, 2)), C=jnp.zeros((1, 4, 2))), "state"),
    (dict(D=jnp.zeros((3,))), "D must be"),
    (dict(z=jnp.zeros((1, 3, 4))), "z must have"),
    (dict(u=jnp.zeros((1, 4, 4), jnp.int32)), "floating point"),
    (dict(impl="cuda"), "valid: auto, pallas, interpret, reference"),
])
def test_bad_inputs_raise(change, message):
  args = dict(u=jnp.zeros((1, 4, 4)), delta=jnp.zeros((1, 4, 4)),
              A=jnp.zeros((4, 3)), B=jnp.zeros((1, 4, 3)),
              C=jnp.zeros((1, 4, 3)), impl="reference")
  args.update(change)
  with pytest.raises(ValueError, match=message):
    selective_scan(**args)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU choice")
def test_auto_on_cpu_picks_the_sequential_scan_for_long_scans():
  assert _auto_impl((32, 11, 256), 2) == "reference"  # S-Mamba's variate tokens
  assert _auto_impl((16, 100, 256), 16) == "sequential"  # a UEA Mamba classifier
