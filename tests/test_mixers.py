"""Tests for the token mixers (paperzoo.layers.mixers): every mixer's shape, finiteness, jit and
gradients; each mixer against an independent NumPy transcription of its equations on the
module's own weights (softmax attention with a key mask, the O(N^2) form of linear attention,
pooling by explicit loops, window attention per window with the shifted-window rule written as
"no wrap-around between the two tokens", agent attention by explicit softmaxes, BiFormer's
routing and its all-regions limit = full attention + LCE); Mamba's padding invariance and the
directions of its two scans; permutation properties; logical names; clear errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paperzoo import sharding
from paperzoo.layers.mixers import MIXERS, make_mixer, reverse_within_length

D_MODEL, HEADS = 12, 3
HEAD_DIM = D_MODEL // HEADS
BATCH, LENGTH = 2, 7
LENGTHS = (7, 4)  # real tokens per example of the 1-D batches (right padding)
ONE_D_MIXERS = ("attention", "linear", "mamba", "agent")
GRID_MIXERS = ("pooling", "window", "biformer")
# Tiny sizes for every mixer's keys; a test overrides what it studies.
# attention_dropout acts only with train=True, so the references (eval) share these modules.
BASE_CONFIG = dict(num_heads=HEADS, attention_dropout=0.25, attention_impl="xla", init="torch",
                   pool_size=3, window_size=4, agent_num=4, routing_regions=2, routing_topk=2,
                   d_state=4, d_conv=3, expand=2, scan_impl="auto")
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


@functools.lru_cache(maxsize=None)
def _cached_mixer(name: str, layer_index: int, items: tuple) -> nnx.Module:
  with nnx.use_eager_sharding(False):
    return make_mixer(name, D_MODEL, dict(items), layer_index=layer_index, rngs=nnx.Rngs(0))


def _mixer(name: str, *, layer_index: int = 0, **overrides) -> nnx.Module:
  """The mixer for BASE_CONFIG + overrides, built once per configuration (building compiles the
  initializers, the slow part on CPU); tests must not modify it (nnx.clone first)."""
  layer_index = layer_index if name == "window" else 0  # only windows depend on it
  return _cached_mixer(name, layer_index, tuple(sorted({**BASE_CONFIG, **overrides}.items())))


@functools.partial(nnx.jit, static_argnames=("grid",))
def _apply(mixer, x, mask=None, *, grid=None):
  return mixer(x, grid=grid, mask=mask, train=False, rngs=None)


def _run(mixer, x, mask=None, grid=None) -> np.ndarray:
  mask = None if mask is None else jnp.asarray(mask)
  return np.asarray(_apply(mixer, jnp.asarray(x), mask, grid=grid))


def _tokens(seed: int, num_tokens: int, batch: int = BATCH) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, num_tokens, D_MODEL)).astype(np.float32)


def _padding_mask(lengths=LENGTHS, num_tokens=LENGTH) -> np.ndarray:
  return np.arange(num_tokens)[None, :] < np.asarray(lengths)[:, None]


# ---- NumPy helpers (float64) -------------------------------------------------------------------


def _np(param) -> np.ndarray:
  return np.asarray(param[...], np.float64)


def _linear(layer, x: np.ndarray) -> np.ndarray:
  return x @ _np(layer.kernel) + _np(layer.bias)


def _heads(h: np.ndarray) -> np.ndarray:
  return h.reshape(h.shape[:-1] + (HEADS, HEAD_DIM))


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _softmax_attention(q, k, v, bias=None, allowed=None) -> np.ndarray:
  """One query set: q [Tq, H, D], k v [Tk, H, D], bias [H, Tq, Tk], allowed [Tq, Tk]."""
  logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  if allowed is not None:
    logits = np.where(allowed[None], logits, -np.inf)
  return np.einsum("hqk,khd->qhd", _softmax(logits), v).reshape(q.shape[0], -1)


def _depthwise_conv_loops(image: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """image [H, W, C] * kernel [k, k, C], zero padding k // 2, by explicit loops."""
  height, width, _ = image.shape
  size = kernel.shape[0]
  pad = size // 2
  out = np.zeros_like(image) + bias
  for i in range(height):
    for j in range(width):
      for a in range(size):
        for b in range(size):
          r, c = i + a - pad, j + b - pad
          if 0 <= r < height and 0 <= c < width:
            out[i, j] += kernel[a, b] * image[r, c]
  return out


# ---- Every mixer -------------------------------------------------------------------------------


def test_mixers_tuple_is_the_interface():
  assert MIXERS == ("attention", "linear", "mamba", "pooling", "window", "agent", "biformer")


@pytest.mark.parametrize("name", MIXERS)
def test_shape_finite_jit_and_gradients(name):
  """1-D-capable mixers on a padded 1-D batch, grid mixers on a 6x6 grid (the window layer is a
  shifted one whose grid needs padding): jitted output shape, finiteness; jitted gradients under
  train=True with attention dropout, finite and not all zero, for the weights and the input."""
  mixer = _mixer(name, layer_index=1)
  if name in GRID_MIXERS:
    grid, mask, x = (6, 6), None, _tokens(0, 36)
  else:
    grid, mask, x = None, jnp.asarray(_padding_mask()), _tokens(0, LENGTH)
  x = jnp.asarray(x)
  y = _run(mixer, x, mask, grid)
  assert y.shape == x.shape and np.isfinite(y).all()

  def loss(module, inputs, rngs):
    out = module(inputs, grid=grid, mask=mask, train=True, rngs=rngs)
    return jnp.sum(jnp.sin(out)), out

  grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, train_out), (param_grads, input_grad) = grad_fn(mixer, x, nnx.Rngs(dropout=1))
  assert np.isfinite(np.asarray(input_grad)).all() and np.abs(np.asarray(input_grad)).max() > 0
  leaves = jax.tree.leaves(param_grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert name == "pooling" or any(np.abs(np.asarray(g)).max() > 0 for g in leaves)
  # Probability dropout acts while training in the softmax mixers, nowhere else.
  changed = not np.allclose(np.asarray(train_out), y, atol=1e-5)
  assert changed == (name in ("attention", "window", "agent", "biformer"))


@pytest.mark.parametrize("name", MIXERS)
def test_every_param_has_logical_names(name):
  mixer = nnx.eval_shape(lambda: make_mixer(name, D_MODEL, BASE_CONFIG, layer_index=0,
                                            rngs=nnx.Rngs(0)))
  sharding.check_logical_names(nnx.state(mixer, nnx.Param))


# ---- attention ---------------------------------------------------------------------------------


def test_attention_matches_masked_softmax_reference():
  mixer = _mixer("attention")
  x, mask = _tokens(1, LENGTH), _padding_mask()
  y = _run(mixer, x, mask)
  mha = mixer.attention
  for b in range(BATCH):
    xb = x[b].astype(np.float64)
    q, k, v = (_heads(_linear(p, xb)) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
    allowed = np.broadcast_to(mask[b][None, :], (LENGTH, LENGTH))
    expected = _linear(mha.out_proj, _softmax_attention(q, k, v, allowed=allowed))
    real = mask[b]
    np.testing.assert_allclose(y[b][real], expected[real], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", ["attention", "linear", "mamba"])
def test_padded_outputs_equal_the_unpadded_sequence(name):
  """With right padding, the real positions' outputs are those of the sequence cut to its
  length, and do not depend on what the padding holds."""
  mixer = _mixer(name)
  x, mask = _tokens(2, LENGTH), _padding_mask()
  y = _run(mixer, x, mask)
  length = LENGTHS[1]
  cut = _run(mixer, x[1:, :length])
  np.testing.assert_allclose(y[1, :length], cut[0], atol=ATOL, rtol=1e-4)
  other = x.copy()
  other[1, length:] = 100.0 * _tokens(3, LENGTH - length, batch=1)[0]
  np.testing.assert_allclose(_run(mixer, other, mask)[1, :length], y[1, :length], atol=ATOL,
                             rtol=1e-4)


@pytest.mark.parametrize("name", ["attention", "linear"])
def test_attention_and_linear_are_permutation_equivariant(name):
  mixer = _mixer(name)
  x = _tokens(4, LENGTH)
  perm = np.random.default_rng(0).permutation(LENGTH)
  np.testing.assert_allclose(_run(mixer, x[:, perm]), _run(mixer, x)[:, perm], atol=ATOL,
                             rtol=1e-4)


# ---- linear ------------------------------------------------------------------------------------


def test_linear_attention_matches_quadratic_form():
  """o_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps), real keys only."""
  mixer = _mixer("linear")
  x, mask = _tokens(5, LENGTH), _padding_mask()
  y = _run(mixer, x, mask)

  def phi(u):
    return np.where(u > 0, u + 1.0, np.exp(u))  # elu(u) + 1

  for b in range(BATCH):
    xb = x[b].astype(np.float64)
    q, k, v = (_heads(_linear(p, xb)) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    scores = np.einsum("qhd,khd->hqk", phi(q), phi(k)) * mask[b][None, None, :]
    out = np.einsum("hqk,khd->qhd", scores, v) / (scores.sum(-1).T[..., None] + 1e-6)
    expected = _linear(mixer.out_proj, out.reshape(LENGTH, D_MODEL))
    np.testing.assert_allclose(y[b], expected, atol=ATOL, rtol=1e-4)


# ---- mamba -------------------------------------------------------------------------------------


def test_reverse_within_length():
  x = np.arange(2 * 5).reshape(2, 5)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  got = np.asarray(reverse_within_length(jnp.asarray(x), jnp.asarray(mask)))
  np.testing.assert_array_equal(got, [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]])
  np.testing.assert_array_equal(np.asarray(reverse_within_length(jnp.asarray(x), None)),
                                x[:, ::-1])


def test_mamba_is_forward_plus_reversed_backward_scan():
  """y = Mamba_fwd(x) + flip(Mamba_bwd(flip(x))); silencing one block's output projection
  leaves a causal (forward only) or anti-causal (backward only) mixer."""
  mixer = _mixer("mamba")
  x = _tokens(6, LENGTH)
  y = _run(mixer, x)
  fwd = np.asarray(nnx.jit(lambda m, h: m(h))(mixer.forward_block, jnp.asarray(x)))
  bwd = np.asarray(nnx.jit(lambda m, h: m(h))(mixer.backward_block, jnp.asarray(x[:, ::-1])))
  np.testing.assert_allclose(y, fwd + bwd[:, ::-1], atol=ATOL, rtol=1e-4)

  t = 3
  nudged = x.copy()
  nudged[:, t] += 1.0
  for silenced, unchanged in (("backward_block", slice(0, t)), ("forward_block",
                                                                 slice(t + 1, None))):
    one_way = nnx.clone(mixer)
    getattr(one_way, silenced).out_proj.kernel[...] = jnp.zeros((2 * D_MODEL, D_MODEL))
    a, b = _run(one_way, x), _run(one_way, nudged)
    np.testing.assert_allclose(a[:, unchanged], b[:, unchanged], atol=1e-6)
    assert np.abs(a - b).max() > 1e-4
  changed = np.abs(_run(mixer, nudged) - y).max(axis=-1)
  assert (changed > 1e-5).all()  # both directions: every token sees token t


# ---- pooling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_size,grid", [(3, (5, 7)), (5, (6, 6))])
def test_pooling_matches_loops(pool_size, grid):
  mixer = _mixer("pooling", pool_size=pool_size)
  height, width = grid
  x = _tokens(7, height * width)
  y = _run(mixer, x, grid=grid)
  image = x.reshape(BATCH, height, width, D_MODEL).astype(np.float64)
  pad = pool_size // 2
  expected = np.zeros_like(image)
  for i in range(height):
    for j in range(width):
      cells = [image[:, r, c] for r in range(i - pad, i + pad + 1)
               for c in range(j - pad, j + pad + 1) if 0 <= r < height and 0 <= c < width]
      expected[:, i, j] = np.mean(cells, axis=0) - image[:, i, j]
  np.testing.assert_allclose(y, expected.reshape(x.shape), atol=1e-5)


# ---- window ------------------------------------------------------------------------------------


def _window_reference(mixer, x: np.ndarray, grid, window, shift) -> np.ndarray:
  """Swin window attention by loops: pad the grid to multiples of `window` (M_h, M_w), roll it by
  -shift, and let token p attend to token q iff they share a window of the rolled grid, q is a
  real cell, and neither wrapped around relative to the other (their offset on the rolled grid
  equals their offset on the unrolled one). Relative position bias by its definition."""
  height, width = grid
  wh, ww = window
  hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
  m = mixer.window_size
  table = _np(mixer.relative_position_bias)
  out = np.zeros((BATCH, height * width, D_MODEL))
  for b in range(BATCH):
    xb = x[b].astype(np.float64)
    q, k, v = (np.pad(_linear(p, xb).reshape(height, width, D_MODEL),
                      ((0, hp - height), (0, wp - width), (0, 0)))
               for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    # Rolled cell (r, c) holds unrolled cell ((r + shift) % hp, (c + shift) % wp).
    cells = [(r, c) for r in range(hp) for c in range(wp)]
    source = {cell: ((cell[0] + shift) % hp, (cell[1] + shift) % wp) for cell in cells}
    for r, c in cells:
      sr, sc = source[(r, c)]
      if sr >= height or sc >= width:
        continue  # a padded query
      keys = []
      for kr in range((r // wh) * wh, (r // wh + 1) * wh):
        for kc in range((c // ww) * ww, (c // ww + 1) * ww):
          ksr, ksc = source[(kr, kc)]
          same_side = (ksr - sr, ksc - sc) == (kr - r, kc - c)
          if ksr < height and ksc < width and same_side:
            keys.append((kr, kc, ksr, ksc))
      logits = np.zeros((HEADS, len(keys)))
      values = np.zeros((len(keys), HEADS, HEAD_DIM))
      for n, (kr, kc, ksr, ksc) in enumerate(keys):
        index = (r - kr + m - 1) * (2 * m - 1) + (c - kc + m - 1)
        logits[:, n] = (np.einsum("hd,hd->h", _heads(q[sr, sc]), _heads(k[ksr, ksc]))
                        / np.sqrt(HEAD_DIM) + table[index])
        values[n] = _heads(v[ksr, ksc])
      attended = np.einsum("hk,khd->hd", _softmax(logits), values).reshape(D_MODEL)
      out[b, sr * width + sc] = attended
  return _linear(mixer.out_proj, out)


@pytest.mark.parametrize("grid,layer_index,window,shift", [
    ((8, 8), 0, (4, 4), 0),   # four windows
    ((8, 8), 1, (4, 4), 2),   # shifted: cyclic shift by M // 2 and the region mask
    ((6, 6), 1, (4, 4), 2),   # padded to 8x8 (padded keys masked), then shifted
    ((3, 5), 1, (3, 4), 0),   # smaller side <= M: no shift, windows clipped to the grid
])
def test_window_attention_matches_loops(grid, layer_index, window, shift):
  mixer = _mixer("window", layer_index=layer_index)
  assert mixer.layout(grid)[0] == window and mixer.layout(grid)[2] == shift
  x = _tokens(8, grid[0] * grid[1])
  np.testing.assert_allclose(_run(mixer, x, grid=grid),
                             _window_reference(mixer, x, grid, window, shift),
                             atol=ATOL, rtol=1e-4)


def test_unshifted_window_attention_is_attention_per_window():
  """The unshifted 8x8 case as the plain per-window computation: gather each 4x4 window's
  tokens, softmax attention with the bias table, scatter back."""
  mixer = _mixer("window")
  x = _tokens(9, 64)
  y = _run(mixer, x, grid=(8, 8))
  coords = [(i, j) for i in range(4) for j in range(4)]
  bias = np.stack([[_np(mixer.relative_position_bias)[(a[0] - b[0] + 3) * 7 + a[1] - b[1] + 3]
                    for b in coords] for a in coords]).transpose(2, 0, 1)
  for wr in range(2):
    for wc in range(2):
      tokens = [(wr * 4 + i) * 8 + wc * 4 + j for i, j in coords]
      xw = x[0, tokens].astype(np.float64)
      q, k, v = (_heads(_linear(p, xw)) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
      expected = _linear(mixer.out_proj, _softmax_attention(q, k, v, bias=bias))
      np.testing.assert_allclose(y[0, tokens], expected, atol=ATOL, rtol=1e-4)


def test_window_attention_is_not_permutation_equivariant():
  mixer = _mixer("window")
  x = _tokens(10, 64)
  perm = np.random.default_rng(1).permutation(64)
  permuted = _run(mixer, x[:, perm], grid=(8, 8))
  assert np.abs(permuted - _run(mixer, x, grid=(8, 8))[:, perm]).max() > 1e-3


# ---- agent -------------------------------------------------------------------------------------


def _agent_reference(mixer, x: np.ndarray, grid, mask) -> np.ndarray:
  """Agent attention by explicit pooling loops and softmaxes; the position biases are the
  module's tables resized bilinearly to the token layout (1 x N for a sequence)."""
  num_tokens = x.shape[1]
  layout = grid if grid is not None else (1, num_tokens)
  n = mixer.agent_num

  def resized(table):
    return np.asarray(jax.image.resize(table[...], table.shape[:2] + layout, "bilinear",
                                       antialias=False),
                      np.float64).reshape(HEADS, n, num_tokens)

  bias_1, bias_2 = resized(mixer.agent_bias), resized(mixer.query_bias).transpose(0, 2, 1)
  if grid is None:
    bins = [list(range(i * num_tokens // n, -(-(i + 1) * num_tokens // n))) for i in range(n)]
  else:
    side = int(round(np.sqrt(n)))
    rows = [range(i * grid[0] // side, -(-(i + 1) * grid[0] // side)) for i in range(side)]
    cols = [range(i * grid[1] // side, -(-(i + 1) * grid[1] // side)) for i in range(side)]
    bins = [[r * grid[1] + c for r in rr for c in cc] for rr in rows for cc in cols]
  out = np.zeros(x.shape, np.float64)
  for b in range(x.shape[0]):
    real = np.ones(num_tokens, bool) if mask is None else mask[b]
    xb = x[b].astype(np.float64)
    q, k, v = (_linear(p, xb) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    # The mean of each bin's real queries; a bin of padding only gives a zero agent.
    agents = np.stack([q[[t for t in members if real[t]]].mean(axis=0)
                       if real[members].any() else np.zeros(D_MODEL) for members in bins])
    agent_values = _softmax_attention(_heads(agents), _heads(k), _heads(v), bias=bias_1,
                                      allowed=np.broadcast_to(real, (n, num_tokens)))
    broadcast = _softmax_attention(_heads(q), _heads(agents), _heads(agent_values), bias=bias_2)
    image = (v * real[:, None]).reshape(layout + (D_MODEL,))
    dwc = _depthwise_conv_loops(image, _np(mixer.dwc_kernel), _np(mixer.dwc_bias))
    out[b] = _linear(mixer.out_proj, broadcast + dwc.reshape(num_tokens, D_MODEL))
  return out


def test_agent_attention_on_a_grid_matches_reference():
  mixer = _mixer("agent", agent_num=4)
  x = _tokens(11, 36)
  np.testing.assert_allclose(_run(mixer, x, grid=(6, 6)),
                             _agent_reference(mixer, x, (6, 6), None), atol=ATOL, rtol=1e-4)


def test_agent_attention_on_a_padded_sequence_matches_reference():
  mixer = _mixer("agent")  # 4 agents over 7 tokens: overlapping bins
  x, mask = _tokens(12, LENGTH), _padding_mask()
  y = _run(mixer, x, mask)
  expected = _agent_reference(mixer, x, None, mask)
  for b in range(BATCH):
    np.testing.assert_allclose(y[b][mask[b]], expected[b][mask[b]], atol=ATOL, rtol=1e-4)
  other = x.copy()
  other[1, LENGTHS[1]:] = -50.0
  np.testing.assert_allclose(_run(mixer, other, mask)[1, :LENGTHS[1]], y[1, :LENGTHS[1]],
                             atol=ATOL, rtol=1e-4)


# ---- biformer ----------------------------------------------------------------------------------


def _biformer_reference(mixer, x: np.ndarray, grid, routed_regions=None) -> np.ndarray:
  """Bi-level routing by loops: region means, affinity, the top-k regions of each region, each
  region's queries against the routed regions' tokens; plus LCE(V). `routed_regions` (a
  function region -> region list) replaces the routing, e.g. with all regions."""
  height, width = grid
  s, topk = mixer.regions, mixer.topk
  rh, rw = height // s, width // s
  regions = [[(r * rh + i) * width + c * rw + j for i in range(rh) for j in range(rw)]
             for r in range(s) for c in range(s)]
  out = np.zeros(x.shape, np.float64)
  for b in range(x.shape[0]):
    xb = x[b].astype(np.float64)
    q, k, v = (_linear(p, xb) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    q_r = np.stack([q[tokens].mean(axis=0) for tokens in regions])
    k_r = np.stack([k[tokens].mean(axis=0) for tokens in regions])
    affinity = q_r @ k_r.T
    attended = np.zeros((height * width, D_MODEL))
    for region, tokens in enumerate(regions):
      if routed_regions is None:
        routed = np.argsort(-affinity[region])[:topk]
      else:
        routed = routed_regions(region)
      keys = [t for other in routed for t in regions[other]]
      attended[tokens] = _softmax_attention(_heads(q[tokens]), _heads(k[keys]), _heads(v[keys]))
    lce = _depthwise_conv_loops(v.reshape(height, width, D_MODEL), _np(mixer.lce_kernel),
                                _np(mixer.lce_bias)).reshape(height * width, D_MODEL)
    out[b] = _linear(mixer.out_proj, attended + lce)
  return out


def test_biformer_with_all_regions_is_full_attention_plus_lce():
  mixer = _mixer("biformer", routing_regions=2, routing_topk=4)
  x = _tokens(13, 64)
  full = _biformer_reference(mixer, x, (8, 8), routed_regions=lambda region: range(4))
  np.testing.assert_allclose(_run(mixer, x, grid=(8, 8)), full, atol=ATOL, rtol=1e-4)


def test_biformer_routing_matches_reference():
  mixer = _mixer("biformer")  # S = 2, k = 2
  x = _tokens(14, 36)
  np.testing.assert_allclose(_run(mixer, x, grid=(6, 6)),
                             _biformer_reference(mixer, x, (6, 6)), atol=ATOL, rtol=1e-4)


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_mixer_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown mixer 'conv'.*attention, linear, mamba, "
                                       "pooling, window, agent, biformer"):
    make_mixer("conv", D_MODEL, BASE_CONFIG, layer_index=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", GRID_MIXERS)
def test_grid_mixers_need_a_matching_grid_and_no_mask(name):
  mixer = _mixer(name)
  x = jnp.zeros((1, 16, D_MODEL))
  with pytest.raises(ValueError, match="2-D grid"):
    mixer(x, grid=None, mask=None, train=False, rngs=None)
  with pytest.raises(ValueError, match="grid 4x5 has 20 cells"):
    mixer(x, grid=(4, 5), mask=None, train=False, rngs=None)
  with pytest.raises(ValueError, match="does not support a padding mask"):
    mixer(x, grid=(4, 4), mask=jnp.ones((1, 16), bool), train=False, rngs=None)


def test_configuration_errors():
  with pytest.raises(ValueError, match="multiples of 2"):
    _mixer("biformer", routing_regions=2)(jnp.zeros((1, 15, D_MODEL)), grid=(3, 5), mask=None,
                                          train=False, rngs=None)
  with pytest.raises(ValueError, match="routing_topk must be >= 1"):
    make_mixer("biformer", D_MODEL, {**BASE_CONFIG, "routing_topk": 0}, layer_index=0,
               rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="perfect square"):
    nnx.eval_shape(lambda: make_mixer("agent", D_MODEL, {**BASE_CONFIG, "agent_num": 3},
                                      layer_index=0, rngs=nnx.Rngs(0))(
        jnp.zeros((1, 16, D_MODEL)), grid=(4, 4), mask=None, train=False, rngs=None))
  with pytest.raises(ValueError, match="pool_size must be odd"):
    make_mixer("pooling", D_MODEL, {"pool_size": 2}, layer_index=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    make_mixer("linear", D_MODEL, {"num_heads": 5}, layer_index=0, rngs=nnx.Rngs(0))


def test_defaults_come_from_config_get():
  """A bare dict (no keys) gives the documented defaults."""
  window = nnx.eval_shape(lambda: make_mixer("window", 16, {}, layer_index=3, rngs=nnx.Rngs(0)))
  assert window.window_size == 4 and window.shifted and window.num_heads == 4
  assert window.relative_position_bias.shape == (49, 4)
  agent = nnx.eval_shape(lambda: make_mixer("agent", 16, {}, layer_index=0, rngs=nnx.Rngs(0)))
  assert agent.agent_num == 16
  biformer = nnx.eval_shape(lambda: make_mixer("biformer", 16, {}, layer_index=0,
                                               rngs=nnx.Rngs(0)))
  assert (biformer.regions, biformer.topk, biformer.impl) == (2, 2, "xla")
  clamped = nnx.eval_shape(lambda: make_mixer("biformer", 16, {"routing_regions": 1},
                                              layer_index=0, rngs=nnx.Rngs(0)))
  assert clamped.topk == 1  # k = 2 > S^2 = 1 routes the one region there is
  mamba = nnx.eval_shape(lambda: make_mixer("mamba", 16, {}, layer_index=0, rngs=nnx.Rngs(0)))
  assert (mamba.forward_block.d_state, mamba.forward_block.d_conv,
          mamba.forward_block.d_inner) == (16, 4, 32)
