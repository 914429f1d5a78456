r"""VAR's tokenizer: a convolutional autoencoder with a multi-scale residual vector quantizer.

Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (NeurIPS 2024), Sec. 3.2 and Algorithms 1-2. An image becomes K token maps
r_1..r_K of growing sides s_1 < ... < s_K (e.g. 1, 2, 3, 4, 6, 8) in one shared codebook Z, so
that a transformer can predict the maps coarse to fine ("next-scale prediction").

Encoding (Algorithm 1), with f = E(image) [S, S, D], S = s_K:

    f_hat = 0, r = f
    for k = 1..K:
        z_k   = area(r, s_k)                        area downsampling to s_k x s_k (identity at s_K)
        r_k   = argmin_j |z_k - Z_j|^2              nearest code at each of the s_k^2 positions
        h_k   = phi_k(up(Z[r_k], S))                up: bicubic to S x S (identity at s_K)
        f_hat = f_hat + h_k,   r = r - h_k

Decoding (Algorithm 2): f_hat = sum_k phi_k(up(Z[r_k], S)), image = D(f_hat).

  area(x, s)   torch's `interpolate(mode="area")` (= adaptive average pooling): output cell i
               averages input rows floor(i H / s) .. ceil((i + 1) H / s) - 1; a block mean when
               s divides H.
  up(x, S)     torch's `interpolate(mode=model.upsample, align_corners=False)`: "bicubic" as
               VAR (Keys' cubic kernel with a = -0.75, edge taps clamped; equal to jax's
               `image.resize(..., "bicubic-pytorch", antialias=False)`), "bilinear" or
               "nearest". Both resizes are separable and linear, so each is two products with
               small constant matrices (`area_matrix`, `upsample_matrix`), cheap to compile.
  phi_k        VAR's `Phi`: h -> (1 - rho) h + rho conv3x3(h), rho = `phi_residual_ratio` (0.5).
               VAR shares `num_phi` (4) convolutions among the K scales ("partially shared"):
               scale k (0-based) uses the phi whose tick, of linspace(1/(3n), 1 - 1/(3n), n), is
               nearest to k / (K - 1).

Training (VAR's `VectorQuantizer2.forward`), with f_hat_k the partial sum after scale k and
sg the stop-gradient:

    vq_loss  = 1/K sum_k [ |f_hat_k - sg(f)|^2 + beta |sg(f_hat_k) - f|^2 ]     (means; beta 0.25)
    decoder input f_hat_st = f + sg(f_hat - f)            straight-through: value f_hat, gradient
                                                          to the encoder as if f_hat were f

The first term (the codebook loss) trains the codebook and the phi convolutions; the second
(commitment) pulls the encoder toward its quantization. With `codebook_update="ema"` the
codebook is instead the exponential moving average of the vectors assigned to each code (van den
Oord et al. 2017, App. A.1; Laplace-smoothed counts), updated in the forward pass; the codebook
loss then trains only the phi's. The task adds the reconstruction loss (paperzoo.tasks.tokenizer).

Codebook health. While training, each forward pass counts which codes any scale chose:
`steps_unused[j]` is the number of training steps since code j was last chosen (NEVER_USED
before its first use), and `codebook_usage` the fraction of codes chosen within the last
`usage_window` steps. A code that has been neither chosen nor restarted for
`restart_after_steps` steps is dead and is restarted: set to one of this batch's lookup inputs
z_k, drawn at random (Dhariwal et al. 2020, "Jukebox"; Zeghidour et al. 2021: restarts from
random encoder outputs). Each draw picks a scale uniformly, then a position of it, so that the
B coarse inputs of scale 1 are not outnumbered by the 64 B of scale 8 (ours; on MNIST the
per-scale usage rose slightly, PSNR was unchanged). All codes start stale, so the first training
step draws every code it did not choose from the data. These counters and the EMA codebook are
`CodebookStatistic` Variables (not `nnx.Param`): the trainer carries them in the train state's
`extra`, which the loss's forward pass updates, so they are checkpointed and resumed like
parameters. In `codebook_update="loss"` mode the codebook is an `nnx.Param` that the optimizer
owns, so a restart writes a per-code offset Variable instead: codebook = param + offset,
offset_j = new_j - param_j. `reset_statistics()` forgets the history. (Outside the trainer, a
training call under `jax.jit` must merge the model from plain dicts inside the traced function,
as the trainer does, or use `nnx.jit`: Variables created outside a trace cannot be mutated
inside it.)

For the next-scale transformer (VAR Sec. 3.2, its code's `idxBl_to_var_input` and
`get_next_autoregressive_input`). Scales are 0-based here: k = 0..K-1, token maps r[k] int32
[B, s[k], s[k]], latents [B, S, S, D], f_hat[k] = h[0] + ... + h[k]:

  encode_indices(images)       -> [r[0], ..., r[K-1]]
  decode_indices(indices)      -> images [B, H, W, C], ~[-1, 1] (unclipped; padding cropped)
  scale_contribution(k, r[k])  -> h[k] = phi_k(up(Z[r[k]], S))
  fhat_from_indices(indices)   -> f_hat[len(indices) - 1] (a prefix r[0..k] is allowed)
  add_scale(f_hat, k, r[k])    -> f_hat + h[k]   (one step of autoregressive decoding)
  next_scale_input(f_hat, k)   -> area(f_hat[k], s[k+1]) [B, s[k+1], s[k+1], D]: the input
                                  from which the transformer predicts r[k+1]
  next_scale_inputs(indices)   -> [area(f_hat[0], s[1]), ..., area(f_hat[K-2], s[K-1])]: all
                                  K - 1 teacher-forcing inputs at once (r[0] is predicted from
                                  the class token alone), VAR's idxBl_to_var_input
  decode_fhat(f_hat)           -> images
  quantizer.codebook()         -> Z [codebook_size, D]

Sampling: f_hat = 0; for k: r[k] ~ transformer(inputs so far); f_hat = add_scale(f_hat, k, r[k]);
if k < K - 1: next input = next_scale_input(f_hat, k); finally decode_fhat(f_hat).

Autoencoder (a compact VQGAN-style convolutional net; VAR uses VQGAN's with 5 stages):
encoder conv3x3 -> for each further width: conv3x3 stride 2, `num_res_blocks` residual blocks
-> GroupNorm, SiLU, conv3x3 to D; the decoder mirrors it with nearest x2 upsampling + conv3x3.
A residual block is h + conv(SiLU(GN(conv(SiLU(GN(h)))))). Images smaller than `padded_size`
(MNIST 28) are padded with -1 (black, the digits' background) and cropped back after decoding.

Config keys (`config.model`):
  channels             (tuple, (32, 64, 64)) encoder widths; each after the first halves the side
  num_res_blocks       (int, 1)         residual blocks per resolution (0: plain conv stacks)
  latent_dim           (int, 32)        D (VAR: 32)
  padded_size          (int, 0)         pad images to this side first (0: no padding)
  scales               (tuple, (1, 2, 3, 4, 6, 8)) s_1 < ... < s_K, s_K = latent side
  codebook_size        (int, 512)       |Z| (VAR: 4096)
  beta                 (float, 0.25)    commitment weight
  codebook_update      (str, "ema")     "ema" | "loss" (VAR trains the codebook by the loss)
  ema_decay            (float, 0.99)    EMA codebook decay
  restart_after_steps  (int, 50)        restart codes unused this many steps (0: never)
  usage_window         (int, 50)        steps over which `codebook_usage` counts a code used
  num_phi              (int, 4)         shared phi convolutions (VAR: 4)
  phi_residual_ratio   (float, 0.5)     rho (VAR: 0.5; 0 makes every phi the identity)
  upsample             (str, "bicubic") "bicubic" | "bilinear" | "nearest"

Input: {"inputs": float [B, H, W, C] in [-1, 1]}. Output of `model(batch, train=..., rngs=...)`:
{"reconstruction" [B, H, W, C], "vq_loss", "vq_loss_per_example" [B] (its terms per image),
"latent_mse" (|f_hat - f|^2), "codebook_usage", "indices" (list of [B, s_k, s_k])}. The quantizer's own output adds "f_hat", "f_hat_st",
"codebook_loss", "commitment_loss", "partial_errors" (|f_hat_k - f|^2 per scale) and
"lookup_inputs" (the z_k).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.layers.metaformer import Conv2d
from paperzoo.registry import MODELS

CODEBOOK_UPDATES = ("ema", "loss")
UPSAMPLE_METHODS = ("bicubic", "bilinear", "nearest")
NEVER_USED = 1 << 20  # steps_unused of a code no step has chosen yet (saturates here)
_EMA_EPSILON = 1e-5  # Laplace smoothing of the EMA counts


class CodebookStatistic(nnx.Variable):
  """Quantizer state that the training forward pass updates (usage counters, EMA codebook).

  Not an `nnx.Param`: no gradient or optimizer touches it; the trainer carries it in `extra`.
  """


# --------------------------------------------------------------------------------------------
# The pieces of the quantizer, as functions (tested one by one).
# --------------------------------------------------------------------------------------------
def area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] averaging weights of torch's area interpolation (adaptive average
  pooling) along one axis: row i averages inputs floor(i n / m) .. ceil((i + 1) n / m) - 1."""
  if size_out > size_in:
    raise ValueError(f"area downsampling cannot enlarge {size_in} to {size_out}")
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    stop = -(-((i + 1) * size_in) // size_out)
    weights[i, start:stop] = 1.0 / (stop - start)
  return weights


def area_downsample(x: jax.Array, size: int) -> jax.Array:
  """[B, H, W, D] -> [B, size, size, D] by area interpolation (module docstring)."""
  if x.shape[1] == size and x.shape[2] == size:
    return x
  rows = jnp.asarray(area_matrix(x.shape[1], size))
  cols = jnp.asarray(area_matrix(x.shape[2], size))
  return jnp.einsum("ih,bhwd,jw->bijd", rows, x, cols)


def _cubic_convolution(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel with torch's a = -0.75."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=None)
def upsample_matrix(size_in: int, size_out: int, method: str) -> np.ndarray:
  """[size_out, size_in] weights of torch's `F.interpolate(mode=method, align_corners=False)`
  along one axis (numpy, float32):

    bicubic   source x = (i + 0.5) n / m - 0.5, taps floor(x) - 1 .. floor(x) + 2 weighted by
              the cubic kernel (a = -0.75) of their distance to x, indices clamped to the edge
    bilinear  x clamped at 0, taps floor(x) and floor(x) + 1 (clamped), linear weights
    nearest   tap floor(i n / m)
  """
  if method not in UPSAMPLE_METHODS:
    raise ValueError(f"unknown upsample {method!r}; valid: {', '.join(UPSAMPLE_METHODS)}")
  weights = np.zeros((size_out, size_in), np.float64)
  ratio = size_in / size_out
  for i in range(size_out):
    if method == "nearest":
      weights[i, min(int(np.floor(i * ratio)), size_in - 1)] = 1.0
      continue
    source = (i + 0.5) * ratio - 0.5
    if method == "bilinear":
      source = max(source, 0.0)
      left = int(np.floor(source))
      fraction = source - left
      weights[i, left] += 1.0 - fraction
      weights[i, min(left + 1, size_in - 1)] += fraction
    else:
      left = int(np.floor(source))
      fraction = source - left
      for offset in (-1, 0, 1, 2):
        tap = min(max(left + offset, 0), size_in - 1)
        weights[i, tap] += _cubic_convolution(fraction - offset)
  return weights.astype(np.float32)


def upsample(x: jax.Array, size: int, method: str) -> jax.Array:
  """[B, s, s, D] -> [B, size, size, D] by torch's interpolation `method` (VAR's bicubic),
  as two small matrix products with `upsample_matrix` (identity when s == size)."""
  if x.shape[1] == size and x.shape[2] == size:
    return x
  rows = jnp.asarray(upsample_matrix(x.shape[1], size, method))
  cols = jnp.asarray(upsample_matrix(x.shape[2], size, method))
  return jnp.einsum("Ii,bijd,Jj->bIJd", rows, x, cols)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """int32 [...] index of the code nearest (squared Euclidean) to each vector of z [..., D]."""
  distances = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ codebook.T
               + jnp.sum(codebook * codebook, -1))
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def phi_index(scale: int, num_scales: int, num_phi: int) -> int:
  """Which of `num_phi` shared phi's scale `scale` (0-based) uses (VAR's PhiPartiallyShared)."""
  ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
  position = scale / (num_scales - 1) if num_scales > 1 else 0.0
  return int(np.argmin(np.abs(ticks - position)))


def check_scales(scales: Sequence[int], latent_size: int) -> tuple[int, ...]:
  scales = tuple(int(s) for s in scales)
  if not scales or any(s < 1 for s in scales) or any(
      b <= a for a, b in zip(scales, scales[1:])):
    raise ValueError(f"model.scales={scales} must be positive and strictly increasing")
  if scales[-1] != latent_size:
    raise ValueError(f"the last scale {scales[-1]} must equal the latent side {latent_size} "
                     f"(image side / 2^(len(channels) - 1)); got scales {scales}")
  return scales


class Phi(nnx.Module):
  """h -> (1 - rho) h + rho conv3x3(h) on [B, S, S, D] (VAR's quant_resi)."""

  def __init__(self, dim: int, residual_ratio: float, *, rngs: nnx.Rngs):
    self.residual_ratio = float(residual_ratio)
    self.conv = Conv2d(dim, dim, kernel=3, stride=1, padding=1, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    if self.residual_ratio == 0.0:
      return h
    return (1.0 - self.residual_ratio) * h + self.residual_ratio * self.conv(h)


# --------------------------------------------------------------------------------------------
# The multi-scale residual quantizer.
# --------------------------------------------------------------------------------------------
class MultiScaleResidualQuantizer(nnx.Module):
  """f [B, S, S, D] -> f_hat, token maps and losses (module docstring, Algorithm 1)."""

  def __init__(self, dim: int, *, scales: Sequence[int], codebook_size: int,
               beta: float = 0.25, codebook_update: str = "ema", ema_decay: float = 0.99,
               restart_after_steps: int = 50, usage_window: int = 50, num_phi: int = 4,
               phi_residual_ratio: float = 0.5, upsample_method: str = "bicubic",
               rngs: nnx.Rngs):
    self.scales = check_scales(scales, int(scales[-1]) if len(scales) else 0)
    if codebook_update not in CODEBOOK_UPDATES:
      raise ValueError(f"unknown codebook_update {codebook_update!r}; valid: "
                       f"{', '.join(CODEBOOK_UPDATES)}")
    if upsample_method not in UPSAMPLE_METHODS:
      raise ValueError(f"unknown upsample {upsample_method!r}; valid: "
                       f"{', '.join(UPSAMPLE_METHODS)}")
    if not 0.0 <= ema_decay < 1.0:
      raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
    if not 0.0 <= phi_residual_ratio <= 1.0:
      raise ValueError(f"phi_residual_ratio={phi_residual_ratio} must be in [0, 1]")
    if codebook_size < 2 or num_phi < 1 or usage_window < 1 or restart_after_steps < 0:
      raise ValueError(f"need codebook_size >= 2, num_phi >= 1, usage_window >= 1 and "
                       f"restart_after_steps >= 0; got {codebook_size}, {num_phi}, "
                       f"{usage_window}, {restart_after_steps}")
    self.dim = dim
    self.codebook_size = codebook_size
    self.beta = float(beta)
    self.codebook_update = codebook_update
    self.ema_decay = float(ema_decay)
    self.restart_after_steps = int(restart_after_steps)
    self.usage_window = int(usage_window)
    self.upsample_method = upsample_method
    self.num_phi = int(num_phi)
    # A small uniform start, as VAR's; with restarts the first step redraws the unchosen codes.
    initial = jax.random.uniform(rngs.params(), (codebook_size, dim), jnp.float32,
                                 -1.0 / codebook_size, 1.0 / codebook_size)
    self.codebook_vectors = (CodebookStatistic(initial) if codebook_update == "ema"
                             else nnx.Param(initial, out_sharding=("vocab", "embed")))
    for name, value in self._initial_statistics(initial).items():
      setattr(self, name, CodebookStatistic(value))
    self.phis = nnx.List([Phi(dim, phi_residual_ratio, rngs=rngs) for _ in range(num_phi)])

  def _initial_statistics(self, codebook: jax.Array) -> dict[str, jax.Array]:
    """The statistics of a quantizer that has not trained yet, with codes `codebook`."""
    size = self.codebook_size
    statistics = {
        "steps_unused": jnp.full((size,), NEVER_USED, jnp.int32),
        # Steps since a code was chosen or restarted: a restart waits this long before the next.
        "steps_stale": jnp.full((size,), self.restart_after_steps, jnp.int32),
        "training_steps": jnp.zeros((), jnp.int32),
    }
    if self.codebook_update == "ema":
      statistics.update(ema_counts=jnp.ones((size,), jnp.float32), ema_sums=codebook)
    else:
      statistics["codebook_offset"] = jnp.zeros_like(codebook)
    return statistics

  def reset_statistics(self) -> None:
    """Forgets the training history (usage counters, EMA sums, restart offsets) and keeps the
    current codebook, as if training started now (e.g. before fine-tuning on new data)."""
    codebook = self.codebook()
    if self.codebook_update == "loss":
      self.codebook_vectors[...] = codebook  # fold the restart offsets into the parameter
    for name, value in self._initial_statistics(codebook).items():
      getattr(self, name)[...] = value

  @property
  def latent_size(self) -> int:
    return self.scales[-1]

  def codebook(self) -> jax.Array:
    """The codes Z [codebook_size, D] in use."""
    if self.codebook_update == "ema":
      return self.codebook_vectors[...]
    return self.codebook_vectors[...] + self.codebook_offset[...]

  def codebook_usage(self) -> jax.Array:
    """The fraction of codes chosen within the last `usage_window` training steps."""
    return jnp.mean((self.steps_unused[...] < self.usage_window).astype(jnp.float32))

  def phi(self, scale: int) -> Phi:
    return self.phis[phi_index(scale, len(self.scales), self.num_phi)]

  def scale_contribution(self, scale: int, indices: jax.Array) -> jax.Array:
    """h_k = phi_k(up(Z[r_k], S)) [B, S, S, D] of token map `indices` [B, s_k, s_k]."""
    codes = jnp.take(self.codebook(), indices, axis=0)
    return self.phi(scale)(upsample(codes, self.latent_size, self.upsample_method))

  def __call__(self, f: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
               ) -> dict[str, Any]:
    if f.shape[1:] != (self.latent_size, self.latent_size, self.dim):
      raise ValueError(f"the quantizer takes latents [B, {self.latent_size}, "
                       f"{self.latent_size}, {self.dim}], got {f.shape}")
    target = jax.lax.stop_gradient(f)
    codebook = self.codebook()
    lookup_codebook = jax.lax.stop_gradient(codebook)
    residual = target
    f_hat = jnp.zeros_like(f)
    indices, lookup_inputs, partial_errors = [], [], []
    # Per-example means [B], so that an evaluation can leave out the padding of a last batch.
    codebook_loss = commitment_loss = jnp.zeros(f.shape[0], jnp.float32)
    for k, size in enumerate(self.scales):
      z = area_downsample(residual, size)
      idx = nearest_codes(z, lookup_codebook)
      h = self.phi(k)(upsample(jnp.take(codebook, idx, axis=0), self.latent_size,
                               self.upsample_method))
      f_hat = f_hat + h
      residual = residual - jax.lax.stop_gradient(h)
      codebook_loss = codebook_loss + jnp.mean((f_hat - target) ** 2, axis=(1, 2, 3))
      commitment_loss = commitment_loss + jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2,
                                                   axis=(1, 2, 3))
      partial_errors.append(jnp.mean((jax.lax.stop_gradient(f_hat) - target) ** 2))
      indices.append(idx)
      lookup_inputs.append(z)
    num_scales = len(self.scales)
    codebook_loss, commitment_loss = codebook_loss / num_scales, commitment_loss / num_scales
    if train:
      self._update_statistics(indices, lookup_inputs, rngs)
    return {
        "f_hat": f_hat,
        "f_hat_st": f + jax.lax.stop_gradient(f_hat - f),
        "indices": indices,
        "vq_loss": jnp.mean(codebook_loss + self.beta * commitment_loss),
        "vq_loss_per_example": codebook_loss + self.beta * commitment_loss,
        "codebook_loss": jnp.mean(codebook_loss),
        "commitment_loss": jnp.mean(commitment_loss),
        "partial_errors": jnp.stack(partial_errors),  # |f_hat_k - f|^2 after each scale
        "lookup_inputs": lookup_inputs,  # z_k [B, s_k, s_k, D], what each lookup quantized
        "codebook_usage": self.codebook_usage(),
    }

  def _update_statistics(self, indices: Sequence[jax.Array], lookup_inputs: Sequence[jax.Array],
                         rngs: nnx.Rngs | None) -> None:
    """Usage counters, the EMA codebook and dead-code restarts, after a training lookup."""
    size = self.codebook_size
    flat_indices = jnp.concatenate([i.reshape(-1) for i in indices])
    flat_inputs = jax.lax.stop_gradient(
        jnp.concatenate([z.reshape(-1, self.dim) for z in lookup_inputs]))
    counts = jnp.zeros((size,), jnp.float32).at[flat_indices].add(1.0)
    used = counts > 0
    self.steps_unused[...] = jnp.where(
        used, 0, jnp.minimum(self.steps_unused[...] + 1, NEVER_USED))
    steps_stale = jnp.where(used, 0, self.steps_stale[...] + 1)
    if self.codebook_update == "ema":
      sums = jnp.zeros((size, self.dim), jnp.float32).at[flat_indices].add(flat_inputs)
      decay = self.ema_decay
      ema_counts = decay * self.ema_counts[...] + (1.0 - decay) * counts
      ema_sums = decay * self.ema_sums[...] + (1.0 - decay) * sums
      total = jnp.sum(ema_counts)
      smoothed = (ema_counts + _EMA_EPSILON) / (total + size * _EMA_EPSILON) * total
      codebook = ema_sums / smoothed[:, None]
    if self.restart_after_steps:
      dead = steps_stale >= self.restart_after_steps
      if rngs is not None:
        key = rngs.dropout()
      else:  # deterministic fallback for calls without rngs (tests, notebooks)
        key = jax.random.fold_in(jax.random.key(0), self.training_steps[...])
      # Each restart picks a scale uniformly, then one of its vectors: pooled draws would
      # almost never pick the B coarse inputs of scale 1 among the B * 130 of scales 1..8.
      scale_key, position_key = jax.random.split(key)
      sizes = np.asarray([z.shape[0] * z.shape[1] * z.shape[2] for z in lookup_inputs])
      starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
      scale = jax.random.randint(scale_key, (size,), 0, len(sizes))
      position = jax.random.uniform(position_key, (size,)) * jnp.asarray(sizes)[scale]
      picks = starts[scale] + jnp.minimum(position.astype(jnp.int32),
                                          jnp.asarray(sizes)[scale] - 1)
      fresh = flat_inputs[picks]
      steps_stale = jnp.where(dead, 0, steps_stale)
      if self.codebook_update == "ema":
        codebook = jnp.where(dead[:, None], fresh, codebook)
        ema_sums = jnp.where(dead[:, None], fresh, ema_sums)  # as one vector counted once
        ema_counts = jnp.where(dead, 1.0, ema_counts)
      else:
        param = jax.lax.stop_gradient(self.codebook_vectors[...])
        self.codebook_offset[...] = jnp.where(dead[:, None], fresh - param,
                                              self.codebook_offset[...])
    if self.codebook_update == "ema":
      self.codebook_vectors[...] = codebook
      self.ema_counts[...] = ema_counts
      self.ema_sums[...] = ema_sums
    self.steps_stale[...] = steps_stale
    self.training_steps[...] = self.training_steps[...] + 1


# --------------------------------------------------------------------------------------------
# The autoencoder.
# --------------------------------------------------------------------------------------------
def _group_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
  return nnx.GroupNorm(
      channels, num_groups=groups, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))


class ResBlock(nnx.Module):
  """h + conv(SiLU(GN(conv(SiLU(GN(h))))))."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.norm1 = _group_norm(channels, rngs=rngs)
    self.conv1 = Conv2d(channels, channels, kernel=3, stride=1, padding=1, rngs=rngs)
    self.norm2 = _group_norm(channels, rngs=rngs)
    self.conv2 = Conv2d(channels, channels, kernel=3, stride=1, padding=1, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    y = self.conv1(jax.nn.silu(self.norm1(h)))
    return h + self.conv2(jax.nn.silu(self.norm2(y)))


def _upsample_nearest_2x(h: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


@MODELS.register("var_tokenizer")
class VARTokenizer(nnx.Module):
  """Encoder, multi-scale residual quantizer, decoder (module docstring)."""

  def __init__(self, config: Any, *, input_shape: tuple[int, ...], rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"var_tokenizer takes images [H, W, C], got inputs of shape "
                       f"{input_shape}")
    height, width, self.image_channels = (int(d) for d in input_shape)
    if height != width:
      raise ValueError(f"var_tokenizer takes square images, got {height}x{width}")
    self.image_size = height
    padded = int(config.get("padded_size", 0)) or height
    if padded < height or (padded - height) % 2:
      raise ValueError(f"model.padded_size={padded} must be >= the image side {height} and "
                       f"differ from it by an even number")
    self.padding = (padded - height) // 2
    widths = tuple(int(c) for c in config.get("channels", (32, 64, 64)))
    if not widths:
      raise ValueError("model.channels must name at least one width")
    factor = 2 ** (len(widths) - 1)
    if padded % factor:
      raise ValueError(f"image side {padded} (after padding) is not divisible by {factor}, the "
                       f"downsampling of model.channels={widths}; set model.padded_size")
    latent_size = padded // factor
    scales = check_scales(config.get("scales", (1, 2, 3, 4, 6, 8)), latent_size)
    latent_dim = int(config.get("latent_dim", 32))
    num_res = int(config.get("num_res_blocks", 1))

    # Encoder: conv in, then per further width a stride-2 conv and residual blocks.
    self.encoder_in = Conv2d(self.image_channels, widths[0], kernel=3, stride=1, padding=1,
                             rngs=rngs)
    encoder_res = [nnx.List([ResBlock(widths[0], rngs=rngs) for _ in range(num_res)])]
    encoder_down = []
    for previous, channels in zip(widths, widths[1:]):
      encoder_down.append(Conv2d(previous, channels, kernel=3, stride=2, padding=1, rngs=rngs))
      encoder_res.append(nnx.List([ResBlock(channels, rngs=rngs) for _ in range(num_res)]))
    self.encoder_res = nnx.List(encoder_res)
    self.encoder_down = nnx.List(encoder_down)
    self.encoder_norm = _group_norm(widths[-1], rngs=rngs)
    self.encoder_out = Conv2d(widths[-1], latent_dim, kernel=3, stride=1, padding=1, rngs=rngs)

    self.quantizer = MultiScaleResidualQuantizer(
        latent_dim, scales=scales, codebook_size=int(config.get("codebook_size", 512)),
        beta=float(config.get("beta", 0.25)),
        codebook_update=config.get("codebook_update", "ema"),
        ema_decay=float(config.get("ema_decay", 0.99)),
        restart_after_steps=int(config.get("restart_after_steps", 50)),
        usage_window=int(config.get("usage_window", 50)),
        num_phi=int(config.get("num_phi", 4)),
        phi_residual_ratio=float(config.get("phi_residual_ratio", 0.5)),
        upsample_method=config.get("upsample", "bicubic"), rngs=rngs)

    # Decoder: the mirror image.
    self.decoder_in = Conv2d(latent_dim, widths[-1], kernel=3, stride=1, padding=1, rngs=rngs)
    decoder_res = [nnx.List([ResBlock(widths[-1], rngs=rngs) for _ in range(num_res)])]
    decoder_up = []
    for channels, next_channels in zip(widths[::-1], widths[::-1][1:]):
      decoder_up.append(Conv2d(channels, next_channels, kernel=3, stride=1, padding=1,
                               rngs=rngs))
      decoder_res.append(nnx.List([ResBlock(next_channels, rngs=rngs) for _ in range(num_res)]))
    self.decoder_res = nnx.List(decoder_res)
    self.decoder_up = nnx.List(decoder_up)
    self.decoder_norm = _group_norm(widths[0], rngs=rngs)
    self.decoder_out = Conv2d(widths[0], self.image_channels, kernel=3, stride=1, padding=1,
                              rngs=rngs)

  @property
  def scales(self) -> tuple[int, ...]:
    return self.quantizer.scales

  # ------------------------------------------------------------------------------------------
  # Autoencoder halves.
  # ------------------------------------------------------------------------------------------
  def encode(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] -> latents f [B, S, S, D] (before quantization)."""
    if images.shape[1:] != (self.image_size, self.image_size, self.image_channels):
      raise ValueError(f"var_tokenizer was built for images [B, {self.image_size}, "
                       f"{self.image_size}, {self.image_channels}], got {images.shape}")
    p = self.padding
    h = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-1.0) if p else images
    h = self.encoder_in(h)
    for block in self.encoder_res[0]:
      h = block(h)
    for down, blocks in zip(self.encoder_down, self.encoder_res[1:]):
      h = down(h)
      for block in blocks:
        h = block(h)
    return self.encoder_out(jax.nn.silu(self.encoder_norm(h)))

  def decode_fhat(self, f_hat: jax.Array) -> jax.Array:
    """Latents [B, S, S, D] -> images [B, H, W, C] (unclipped, ~[-1, 1])."""
    h = self.decoder_in(f_hat)
    for block in self.decoder_res[0]:
      h = block(h)
    for up, blocks in zip(self.decoder_up, self.decoder_res[1:]):
      h = up(_upsample_nearest_2x(h))
      for block in blocks:
        h = block(h)
    images = self.decoder_out(jax.nn.silu(self.decoder_norm(h)))
    p = self.padding
    return images[:, p:p + self.image_size, p:p + self.image_size] if p else images

  # ------------------------------------------------------------------------------------------
  # Tokens.
  # ------------------------------------------------------------------------------------------
  def encode_indices(self, images: jax.Array) -> list[jax.Array]:
    """Images [B, H, W, C] in [-1, 1] -> token maps [r[0], ..., r[K-1]], int32
    [B, s[k], s[k]]."""
    return self.quantizer(self.encode(images), train=False)["indices"]

  def scale_contribution(self, scale: int, indices: jax.Array) -> jax.Array:
    """h[k] = phi_k(up(Z[r[k]], S)) [B, S, S, D]: what token map `indices` = r[k] of scale
    k = `scale` adds to f_hat."""
    self._check_token_map(scale, indices)
    return self.quantizer.scale_contribution(scale, indices)

  def fhat_from_indices(self, indices: Sequence[jax.Array]) -> jax.Array:
    """f_hat[k] = h[0] + ... + h[k] [B, S, S, D] from a prefix [r[0], ..., r[k]], k < K."""
    if not 1 <= len(indices) <= len(self.scales):
      raise ValueError(f"give 1 to {len(self.scales)} token maps, got {len(indices)}")
    f_hat = self.scale_contribution(0, indices[0])
    for k in range(1, len(indices)):
      f_hat = f_hat + self.scale_contribution(k, indices[k])
    return f_hat

  def add_scale(self, f_hat: jax.Array, scale: int, indices: jax.Array) -> jax.Array:
    """f_hat + h[scale]: one step of autoregressive decoding (VAR's
    get_next_autoregressive_input, with `next_scale_input`)."""
    return f_hat + self.scale_contribution(scale, indices)

  def next_scale_input(self, f_hat: jax.Array, scale: int) -> jax.Array:
    """area(f_hat, s[k+1]) [B, s[k+1], s[k+1], D] for k = `scale` and f_hat = f_hat[k]: the
    input from which the transformer predicts r[k+1]."""
    if not 0 <= scale < len(self.scales) - 1:
      raise ValueError(f"next_scale_input: scale must be in [0, {len(self.scales) - 2}], got "
                       f"{scale}")
    return area_downsample(f_hat, self.scales[scale + 1])

  def next_scale_inputs(self, indices: Sequence[jax.Array]) -> list[jax.Array]:
    """Teacher-forcing inputs of the next-scale transformer (VAR's idxBl_to_var_input):
    [area(f_hat[0], s[1]), ..., area(f_hat[K-2], s[K-1])] from all K token maps."""
    if len(indices) != len(self.scales):
      raise ValueError(f"give all {len(self.scales)} token maps, got {len(indices)}")
    inputs = []
    f_hat = jnp.zeros((indices[0].shape[0], self.scales[-1], self.scales[-1],
                       self.quantizer.dim), jnp.float32)
    for k in range(len(self.scales) - 1):
      f_hat = self.add_scale(f_hat, k, indices[k])
      inputs.append(self.next_scale_input(f_hat, k))
    return inputs

  def decode_indices(self, indices: Sequence[jax.Array]) -> jax.Array:
    """All K token maps -> images [B, H, W, C] (unclipped, ~[-1, 1])."""
    if len(indices) != len(self.scales):
      raise ValueError(f"give all {len(self.scales)} token maps, got {len(indices)}")
    return self.decode_fhat(self.fhat_from_indices(indices))

  def _check_token_map(self, scale: int, indices: jax.Array) -> None:
    if not 0 <= scale < len(self.scales):
      raise ValueError(f"scale must be in [0, {len(self.scales) - 1}], got {scale}")
    size = self.scales[scale]
    if indices.ndim != 3 or indices.shape[1:] != (size, size):
      raise ValueError(f"the token map of scale {scale} must be [B, {size}, {size}], got "
                       f"{indices.shape}")

  # ------------------------------------------------------------------------------------------
  # Training forward pass.
  # ------------------------------------------------------------------------------------------
  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> dict[str, Any]:
    quantized = self.quantizer(self.encode(batch["inputs"]), train=train, rngs=rngs)
    return {
        "reconstruction": self.decode_fhat(quantized["f_hat_st"]),
        "vq_loss": quantized["vq_loss"],
        "vq_loss_per_example": quantized["vq_loss_per_example"],
        "latent_mse": quantized["partial_errors"][-1],
        "codebook_usage": quantized["codebook_usage"],
        "indices": quantized["indices"],
    }
