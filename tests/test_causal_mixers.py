"""Tests for the causal mixers (paperzoo.layers.causal_mixers): each mixer's parallel form
against its paper's recurrence written step by step in NumPy on the module's own weights
(attention as an explicit masked softmax with RoPE, linear attention's phi sums, GLA's gated
state with its gate formula, Lightning Attention's decayed state with SRMSNorm and the output
gate, Mamba's discretized SSM step loop); decoding (prefill of a prompt, then a jitted step per
token) equal to the parallel form for every mixer; gradients; bfloat16 inputs; names; the
decay formula; errors. Also `dot_product_attention(causal=True)` for every impl against the
reference.

Sizes are tiny and odd (T = 13, chunk 4, prompt 5) so chunk tails and cache positions past the
prompt are exercised. Weights are redrawn at unit scale (GPT-2's 0.02 makes every softmax
nearly uniform and every linear attention nearly a running mean), except Mamba's own init.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paperzoo import sharding
from paperzoo.config import ConfigError
from paperzoo.layers import attention
from paperzoo.layers.attention import dot_product_attention
from paperzoo.layers.causal_mixers import (CAUSAL_MIXERS, lightning_log_decays,
                                           make_causal_mixer)

D_MODEL, HEADS, HEAD_DIM = 16, 2, 8
BATCH, LENGTH, PROMPT, MAX_LENGTH = 2, 13, 5, 16
LAYER_INDEX, NUM_LAYERS = 1, 3
BASE_CONFIG = dict(num_heads=HEADS, bias=True, attention_impl="xla", attention_dropout=0.0,
                   positions="rotary", rope_base=10000.0, linear_attention_impl="chunked",
                   chunk_size=4, gla_key_ratio=0.5, gla_gate_rank=4, gla_gate_temperature=2.0,
                   lightning_decay="alibi", d_state=4, d_conv=3, expand=2, scan_impl="auto")
ATOL = 2e-5  # float32, relative to the reference's largest magnitude
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}

pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _redraw(mixer: nnx.Module, seed: int) -> None:
  """Unit-scale weights: kernels N(0, 1/fan_in), vectors N(0, 0.3^2), norm scales 1 + that."""
  rng = np.random.default_rng(seed)

  def draw(path, value):
    name = jax.tree_util.keystr(path)
    if value.ndim == 2:
      new = rng.normal(size=value.shape) / math.sqrt(value.shape[0])
    else:
      new = (1.0 if "norm_scale" in name else 0.0) + 0.3 * rng.normal(size=value.shape)
    return jnp.asarray(new, value.dtype)

  nnx.update(mixer, jax.tree_util.tree_map_with_path(draw, nnx.state(mixer, nnx.Param)))


@functools.lru_cache(maxsize=None)
def _cached(name: str, items: tuple) -> tuple[nnx.GraphDef, nnx.State]:
  # Built in one jitted program: compiling each eager initializer op costs seconds on CPU.
  with nnx.use_eager_sharding(False):
    mixer = nnx.jit(lambda: make_causal_mixer(name, D_MODEL, dict(items),
                                              layer_index=LAYER_INDEX, num_layers=NUM_LAYERS,
                                              rngs=nnx.Rngs(0)))()
  if name != "mamba":
    _redraw(mixer, seed=1)
  return nnx.split(mixer)


def _mixer(name: str, **overrides) -> nnx.Module:
  """A fresh copy of the mixer for BASE_CONFIG + overrides (built and redrawn once)."""
  return nnx.merge(*_cached(name, tuple(sorted({**BASE_CONFIG, **overrides}.items()))))


def _tokens(seed: int, length: int = LENGTH) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, length, D_MODEL)).astype(np.float32)


@nnx.jit
def _parallel(mixer, x):
  return mixer(x, train=False, rngs=None)


def _close(got, want, atol=ATOL):
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             atol=atol * max(np.abs(want).max(), 1e-3), rtol=0)


# ---- NumPy helpers (float64) -------------------------------------------------------------------


def _np(param) -> np.ndarray:
  return np.asarray(param[...], np.float64)


def _linear(layer, x: np.ndarray) -> np.ndarray:
  out = x @ _np(layer.kernel)
  return out + _np(layer.bias) if layer.bias is not None else out


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _rms(o, eps):
  return o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps)


# ---- Interface ---------------------------------------------------------------------------------


def test_causal_mixers_tuple_and_unknown_name():
  assert CAUSAL_MIXERS == ("attention", "linear", "gla", "lightning", "mamba")
  with pytest.raises(ConfigError, match=r"^model.mixer='x': unknown mixer 'x'; valid: "
                                        r"attention, linear, gla, lightning, mamba$"):
    make_causal_mixer("x", D_MODEL, {}, layer_index=0, num_layers=1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_every_param_has_logical_names(name):
  mixer = nnx.eval_shape(lambda: make_causal_mixer(name, D_MODEL, BASE_CONFIG, layer_index=0,
                                                   num_layers=2, rngs=nnx.Rngs(0)))
  sharding.check_logical_names(nnx.state(mixer, nnx.Param))


# ---- Each mixer against its paper's recurrence -------------------------------------------------


def _rope(x, positions, base=10000.0):
  """RoPE, rotate-half: x [T, H, D] rotated by each row's position."""
  half = x.shape[-1] // 2
  angles = positions[:, None] * base ** (-np.arange(half) * 2.0 / x.shape[-1])
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_attention_matches_masked_softmax(positions):
  mixer = _mixer("attention", positions=positions)
  x = _tokens(2)
  want = np.zeros(x.shape)
  for b in range(BATCH):
    qkv = _linear(mixer.qkv_proj, x[b].astype(np.float64)).reshape(LENGTH, 3, HEADS, HEAD_DIM)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    if positions == "rotary":
      q, k = _rope(q, np.arange(LENGTH)), _rope(k, np.arange(LENGTH))
    for t in range(LENGTH):
      logits = np.einsum("hd,jhd->hj", q[t], k[:t + 1]) / math.sqrt(HEAD_DIM)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      want[b, t] = _linear(mixer.out_proj, np.einsum("hj,jhd->hd", probs, v[:t + 1]).ravel())
  _close(_parallel(mixer, jnp.asarray(x)), want)


def test_linear_attention_matches_phi_sums():
  mixer = _mixer("linear")
  x = _tokens(3)
  phi = lambda u: np.where(u > 0, u + 1.0, np.exp(u))  # elu(u) + 1
  want = np.zeros(x.shape)
  for b in range(BATCH):
    qkv = _linear(mixer.qkv_proj, x[b].astype(np.float64)).reshape(LENGTH, 3, HEADS, HEAD_DIM)
    S, z = np.zeros((HEADS, HEAD_DIM, HEAD_DIM)), np.zeros((HEADS, HEAD_DIM))
    for t in range(LENGTH):
      phi_q, phi_k, v = phi(qkv[t, 0]), phi(qkv[t, 1]), qkv[t, 2]
      S += phi_k[:, :, None] * v[:, None, :]
      z += phi_k
      o = np.einsum("hd,hde->he", phi_q, S) / (np.einsum("hd,hd->h", phi_q, z)[:, None] + 1e-6)
      want[b, t] = _linear(mixer.out_proj, o.ravel())
  _close(_parallel(mixer, jnp.asarray(x)), want)


def test_gla_matches_gated_recurrence():
  mixer = _mixer("gla")
  tau, d_k, d_v = 2.0, 4, 8  # gla_gate_temperature; key width 0.5 * 16 / 2 heads; 16 / 2
  x = _tokens(4)
  want = np.zeros(x.shape)
  for b in range(BATCH):
    xb = x[b].astype(np.float64)
    qkv = xb @ _np(mixer.qkv_proj.kernel)
    q = qkv[:, :HEADS * d_k].reshape(LENGTH, HEADS, d_k)
    k = qkv[:, HEADS * d_k:2 * HEADS * d_k].reshape(LENGTH, HEADS, d_k)
    v = qkv[:, 2 * HEADS * d_k:].reshape(LENGTH, HEADS, d_v)
    # alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1 / tau)
    alpha = (1.0 / (1.0 + np.exp(-_linear(mixer.gate_up, _linear(mixer.gate_down, xb)))))
    alpha = (alpha ** (1.0 / tau)).reshape(LENGTH, HEADS, d_k)
    r = _silu(_linear(mixer.output_gate, xb))
    S = np.zeros((HEADS, d_k, d_v))
    for t in range(LENGTH):
      S = alpha[t][:, :, None] * S + k[t][:, :, None] * v[t][:, None, :]
      o = np.einsum("hk,hkv->hv", q[t], S) / math.sqrt(d_k)
      o = _rms(o, 1e-5) * _np(mixer.norm_scale)
      want[b, t] = (o.ravel() * r[t]) @ _np(mixer.out_proj.kernel)
  _close(_parallel(mixer, jnp.asarray(x)), want)


def test_lightning_matches_decayed_recurrence():
  mixer = _mixer("lightning")
  # TransNormerLLM's code: lambda = exp(-m_h (1 - l / (L - 1) + 1e-5)), m = ALiBi's 2^(-8h/H).
  lam = np.exp(-np.array([2.0 ** -4, 2.0 ** -8]) * (1 - LAYER_INDEX / (NUM_LAYERS - 1) + 1e-5))
  x = _tokens(5)
  want = np.zeros(x.shape)
  for b in range(BATCH):
    qkvu = _linear(mixer.qkvu_proj, x[b].astype(np.float64))
    q, k, v, u = np.split(qkvu, 4, axis=-1)
    q, k = _silu(q).reshape(LENGTH, HEADS, HEAD_DIM), _silu(k).reshape(LENGTH, HEADS, HEAD_DIM)
    v = v.reshape(LENGTH, HEADS, HEAD_DIM)
    S = np.zeros((HEADS, HEAD_DIM, HEAD_DIM))
    for t in range(LENGTH):
      S = lam[:, None, None] * S + k[t][:, :, None] * v[t][:, None, :]
      o = np.einsum("hk,hkv->hv", q[t], S).ravel()  # no scale
      want[b, t] = _linear(mixer.out_proj, _rms(o, 1e-6) * u[t])  # SRMSNorm over all heads
  _close(_parallel(mixer, jnp.asarray(x)), want)


def test_mamba_matches_numpy_step_loop():
  block = _mixer("mamba").block
  w = _np
  d_inner, n, r, k = block.d_inner, block.d_state, block.dt_rank, block.d_conv
  A = -np.exp(w(block.A_log))
  x = _tokens(6)
  want = np.zeros(x.shape)
  for b in range(BATCH):
    u_raw, z = np.split(x[b].astype(np.float64) @ w(block.in_proj.kernel), 2, axis=-1)
    h = np.zeros((d_inner, n))
    for t in range(LENGTH):
      conv = w(block.conv_bias) + sum(w(block.conv_kernel)[j] * u_raw[t - (k - 1) + j]
                                      for j in range(k) if t - (k - 1) + j >= 0)
      u = _silu(conv)
      proj = u @ w(block.x_proj.kernel)
      delta = np.log1p(np.exp(proj[:r] @ w(block.dt_proj.kernel) + w(block.dt_proj.bias)))
      h = np.exp(delta[:, None] * A) * h + (delta * u)[:, None] * proj[None, r:r + n]
      y = (h @ proj[r + n:] + w(block.D) * u) * _silu(z[t])
      want[b, t] = y @ w(block.out_proj.kernel)
  _close(_parallel(_mixer("mamba"), jnp.asarray(x)), want)


def test_lightning_decays():
  def rates(*args):
    return -lightning_log_decays(*args).astype(np.float64)
  # ALiBi's slopes 2^(-8h/H), h = 1..H; H = 3 takes H = 2's and every other one of H = 4's.
  np.testing.assert_allclose(rates(4, 0, 5), np.array([2.0 ** -2, 2.0 ** -4, 2.0 ** -6,
                                                       2.0 ** -8]) * (1 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(rates(3, 0, 1), np.array([2.0 ** -4, 2.0 ** -8, 2.0 ** -2])
                             * (1 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(rates(4, 4, 5), 1e-5 * rates(4, 0, 5) / (1 + 1e-5), rtol=1e-5)
  # Eq. 10 as printed, the h-th head of the l-th layer: 8h/H (1 - l/L).
  np.testing.assert_allclose(rates(4, 0, 2, "paper"), 8 * np.arange(1, 5) / 4 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(rates(4, 1, 2, "paper"), 0.0)
  with pytest.raises(ValueError, match="valid: alibi, paper"):
    lightning_log_decays(4, 0, 2, "learned")


# ---- Decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_prefill_then_steps_equal_the_parallel_form(name):
  mixer = _mixer(name)
  x = jnp.asarray(_tokens(7))
  want = np.asarray(_parallel(mixer, x))
  prompt_out, cache = nnx.jit(lambda m, x: m.prefill(x, m.init_cache(BATCH, MAX_LENGTH)))(
      mixer, x[:, :PROMPT])
  step = nnx.jit(lambda m, x_t, cache, position: m.step(x_t, cache, position))
  outs = [np.asarray(prompt_out)]
  for position in range(PROMPT, LENGTH):
    y_t, cache = step(mixer, x[:, position:position + 1], cache, jnp.int32(position))
    outs.append(np.asarray(y_t))
  shapes = jax.tree.map(jnp.shape, cache)
  assert shapes == jax.tree.map(jnp.shape, mixer.init_cache(BATCH, MAX_LENGTH))
  _close(np.concatenate(outs, axis=1), want)


# ---- Gradients and bfloat16 --------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_gradients_and_bfloat16_inputs(name):
  """Jitted gradients (train=True, attention dropout on for "attention") are finite and not all
  zero for the weights and the input; bfloat16 inputs give bfloat16 outputs near float32's."""
  mixer = _mixer(name, **({"attention_dropout": 0.25} if name == "attention" else {}))
  x = jnp.asarray(_tokens(8))

  @nnx.jit
  def run(module, inputs, rngs):
    def loss(module, inputs, rngs):
      out = module(inputs, train=True, rngs=rngs)
      return jnp.sum(jnp.sin(out)), out
    (_, train_out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        module, inputs, rngs)
    half = module(inputs.astype(jnp.bfloat16), train=False, rngs=None)
    return train_out, grads, half, module(inputs, train=False, rngs=None)

  train_out, (param_grads, input_grad), half, full = run(mixer, x, nnx.Rngs(dropout=1))
  assert np.isfinite(np.asarray(input_grad)).all() and np.abs(np.asarray(input_grad)).max() > 0
  leaves = jax.tree.leaves(param_grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # Every weight gets a gradient (attention's key bias too: RoPE rotates it per position, so it
  # is not a constant shift of a query's logits).
  assert all(np.abs(np.asarray(g)).max() > 0 for g in leaves)
  # Probability dropout acts while training in the softmax mixer only.
  changed = not np.allclose(np.asarray(train_out), np.asarray(full), atol=1e-6)
  assert changed == (name == "attention")
  assert half.dtype == jnp.bfloat16
  _close(np.asarray(half.astype(jnp.float32)), np.asarray(full), atol=5e-2)


# ---- dot_product_attention(causal=True) --------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (5, 9)])
def test_causal_attention_every_impl_matches_reference(q_len, kv_len):
  """Forward and gradients of xla, flash and flash_interpret (and xla with a key mask too)
  against the reference, causal=True; with q_len < kv_len the last query sees every key."""
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.normal(size=(1, q_len, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, kv_len, 2, 8)), jnp.float32) for _ in range(2))
  key_mask = jnp.asarray(np.arange(kv_len) != 1)[None, None, None, :]
  cases = [("xla", None), ("flash", None), ("flash_interpret", None), ("xla", key_mask)]

  def value_and_grads(impl, mask):
    def loss(q, k, v):
      out = dot_product_attention(q, k, v, mask=mask, causal=True, impl=impl)
      return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  def everything(q, k, v):
    return [(value_and_grads(impl, mask), value_and_grads("reference", mask))
            for impl, mask in cases]

  # The interpreted kernel is a large HLO loop whose XLA:CPU compile dominates; these options
  # cut it without changing float32 results (as tests/pallas_kernels/conftest.py does).
  compiled = jax.jit(everything).lower(q, k, v).compile(compiler_options=_FAST_COMPILE)
  for ((_, out), grads), ((_, ref_out), ref_grads) in compiled(q, k, v):
    _close(out, ref_out, atol=1e-5)
    for got, want in zip(grads, ref_grads):
      _close(got, want, atol=1e-4)
  # The reference itself: query i sees keys j <= i + kv_len - q_len.
  ref = np.asarray(dot_product_attention(q, k, v, causal=True, impl="reference"))
  qn, kn, vn = (np.asarray(a, np.float64)[0] for a in (q, k, v))
  for i in range(q_len):
    seen = i + kv_len - q_len + 1
    logits = np.einsum("hd,jhd->hj", qn[i], kn[:seen]) / math.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    _close(ref[0, i], np.einsum("hj,jhd->hd", probs, vn[:seen]), atol=1e-5)


def test_blocked_causal_attention_matches_the_reference_across_blocks():
  """Odd length over several blocks (the last partial): forward and gradients; a mask or
  q_len != kv_len is refused in one line."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 2, 8)), jnp.float32) for _ in range(3))
  weights = jnp.cos(jnp.arange(q.size).reshape(q.shape))

  def loss(impl, block):
    def f(q, k, v):
      if impl == "blocked":
        out = attention.blocked_causal_attention(q, k, v, block=block)
      else:
        out = dot_product_attention(q, k, v, causal=True, impl="reference")
      return jnp.sum(out * weights)
    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

  want, want_grads = loss("reference", 0)
  for block in (8, 64):  # several blocks, the last partial; one block
    got, grads = loss("blocked", block)
    _close(got, want, atol=1e-4)
    for g, w in zip(grads, want_grads):
      _close(g, w, atol=1e-5)
  np.testing.assert_allclose(dot_product_attention(q, k, v, causal=True, impl="blocked"),
                             dot_product_attention(q, k, v, causal=True, impl="reference"),
                             atol=1e-6)
  with pytest.raises(ValueError, match="impl='blocked' is causal self-attention"):
    dot_product_attention(q, k[:, :30], v[:, :30], causal=True, impl="blocked")
