r"""Gaussian diffusion (DDPM / improved DDPM / DDIM) and flow matching, as pure functions.

Everything here is a function of arrays and of a `GaussianDiffusion` (numpy float64 constants);
the network enters only through its outputs (losses) or as a function `net(x, t)` (samplers), so
the generation task, tests and notebooks share one implementation. Samplers are `lax.scan`
loops: jit-able, and optionally returning the whole trajectory for pictures.

DDPM (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020)
--------------------------------------------------------------------------
Forward process with betas beta_1..beta_T (here indexed t = 0..T-1), alpha_t = 1 - beta_t,
abar_t = prod_{s <= t} alpha_s:

    q(x_t | x_0)      = N(sqrt(abar_t) x_0, (1 - abar_t) I)                          (Eq. 4)
    q(x_{t-1}|x_t,x_0)= N(mu~_t, beta~_t I),  beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    mu~_t             = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
                        + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t             (Eq. 7)

The network predicts the noise eps; x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), and the
reverse mean is mu~_t(x_0, x_t) with x_0 optionally clipped to [-1, 1]. `linear_betas`: DDPM's
linear schedule 1e-4 .. 0.02 over T = 1000 steps (scaled by 1000 / T for other T, as improved
DDPM does, so that abar_T stays close to 0).

Improved DDPM (Nichol & Dhariwal, ICML 2021): learned variance, hybrid loss
--------------------------------------------------------------------------
With `learn_sigma` the network outputs 2C channels [eps, v]; v in [-1, 1] (roughly) interpolates
the log variance between the two extremes (Eq. 15):

    log Sigma_t = frac log beta_t + (1 - frac) log beta~_t,   frac = (v + 1) / 2

(log beta~_0 = log beta~_1, as beta~_0 = 0). Without `learn_sigma` the variance is fixed to
"fixed_large", beta~_1 at t = 0 and beta_t after (improved DDPM's default for fixed variances).
The variational bound, in bits per dimension (improved DDPM, Eq. 4-6):

    L_t   = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / D / log 2        t >= 1
    L_0   = -log p(x_0 | x_1) / D / log 2   (discretized Gaussian: 256 bins of width 2/255 on
            [-1, 1], the edge bins extended to +-infinity; DDPM Eq. 13)
    L_T   = KL(q(x_T | x_0) || N(0, I)) / D / log 2                            (the prior term)
    bits/dim = L_T + sum_{t=0}^{T-1} L_t

The hybrid loss (Eq. 16) is L_simple + lambda L_vlb, L_simple = |eps - eps_theta|^2 (mean over
dimensions) and L_vlb = sum_t L_t, estimated from the one sampled t as T L_t, lambda = 0.001.
The stop-gradient on the mean (Sec. 3.1) makes L_vlb train only the variance: the mean in L_t
comes from stop_gradient(eps_theta). (lambda T = 1 at T = 1000: guided-diffusion / DiT add L_t
as is.)

Respacing (improved DDPM Sec. 4): sampling with a subsequence S of the T steps uses the betas
    beta^S_i = 1 - abar_{S_i} / abar_{S_{i-1}}     (abar_{S_{-1}} = 1)
so that abar^S_i = abar_{S_i}: the respaced process has exactly the original marginals at the
kept steps. The network is still called with the original timestep S_i
(`GaussianDiffusion.timesteps`), and a learned variance interpolates the respaced betas.

DDIM (Song et al., ICLR 2021, Eq. 12): with x_0 and eps predicted at step i,
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)
(eta = 0: deterministic; eta = 1: DDPM's posterior variance). With clipping, eps is recomputed
from the clipped x_0.

Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; SiT, Ma et al. 2024)
----------------------------------------------------------------------------------------
Convention (SiT's paper notation, also SD3's): t in [0, 1], t = 0 is data and t = 1 is noise,

    x_t = (1 - t) x_0 + t eps,      velocity target v = dx_t/dt = eps - x_0

trained with |v_theta(x_t, t) - (eps - x_0)|^2 (mean over dimensions), t ~ U(0, 1). Samples
integrate dx/dt = v_theta(x, t) from t = 1 (x ~ N(0, I)) to t = 0 on a uniform grid of N
steps, with Euler (N network calls) or Heun (explicit trapezoid, 2N calls). (SiT's released code
runs time the other way, t = 0 noise; the two are the same model with t -> 1 - t, v -> -v.)

Classifier-free guidance (Ho & Salimans 2022)
---------------------------------------------
The network is called on the class label and on the null label; on the first `guided_channels`
channels (eps or velocity, not the variance channels, which come from the conditional call):

    out = cond + (s - 1) (cond - uncond)      (= uncond + s (cond - uncond); this form gives
                                               exactly `cond` at s = 1)

API
---
  linear_betas(T, beta_start, beta_end) -> betas                    numpy float64 [T]
  GaussianDiffusion.from_betas(betas)                               all derived constants
  spaced_timesteps(T, count) / respace(diffusion, kept_timesteps)   sampling with fewer steps
  q_sample, q_posterior_mean_variance, predict_x0_from_eps, predict_eps_from_x0
  p_mean_variance(diffusion, output, x_t, t, learn_sigma, clip_denoised) -> ReverseStep
  normal_kl, discretized_gaussian_log_likelihood (nats, elementwise)
  vlb_term_bits(...) -> [B]   L_t in bits/dim;  prior_bits(...) -> [B]   L_T
  ddpm_loss(...) -> ([B] loss, {"mse", "vlb"})   the hybrid loss per example
  ddpm_sample(...), ddim_sample(...)                                 -> (x_0, trajectory | None)
  flow_interpolate, flow_velocity_target, flow_loss, flow_sample(method="euler"|"heun")
  classifier_free_guidance(cond, uncond, scale, guided_channels), guided_net(...)

Index conventions: `t` arguments of the DDPM functions are int32 [B] indices into the
diffusion's arrays (0 .. num_timesteps - 1); for a respaced diffusion, index i stands for the
original timestep `diffusion.timesteps[i]`, which is what the network sees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun")}
OBJECTIVES = tuple(SAMPLERS)
FLOW_METHODS = SAMPLERS["flow"]

# Half the width of one of the 256 pixel bins on [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Floors inside logarithms of probabilities (improved DDPM's 1e-12) and of beta~ (beta~_0 = 0).
_PROB_FLOOR = 1e-12

Net = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
                 ) -> np.ndarray:
  """DDPM's linear schedule, [T] float64; the endpoints are for T = 1000 and scale by 1000 / T
  (improved DDPM's `get_named_beta_schedule("linear")`)."""
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps={num_timesteps} must be >= 1")
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """The constants of one (possibly respaced) diffusion, numpy float64 [num_timesteps] each.

  `timesteps[i]` is the original timestep index i stands for (the identity unless respaced): the
  network is always called with the original timestep.
  """

  betas: np.ndarray
  timesteps: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray  # multiplies x_0
  posterior_mean_coef2: np.ndarray  # multiplies x_t

  @classmethod
  def from_betas(cls, betas: np.ndarray, timesteps: np.ndarray | None = None
                 ) -> "GaussianDiffusion":
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError("betas must be a 1-D array with values in (0, 1]")
    timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
    if timesteps.shape != betas.shape:
      raise ValueError(f"timesteps {timesteps.shape} and betas {betas.shape} differ in shape")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta~_0 = 0: its log is clipped to log beta~_1 (improved DDPM), the variance itself is not.
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else (
        betas.copy())
    return cls(
        betas=betas, timesteps=timesteps.astype(np.int64), alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev, posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas)
        / (1.0 - alphas_cumprod))

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)


def spaced_timesteps(num_timesteps: int, count: int) -> np.ndarray:
  """`count` original timesteps evenly spaced over [0, T - 1], both ends included."""
  if not 1 <= count <= num_timesteps:
    raise ValueError(f"sampling steps {count} must be in [1, {num_timesteps}]")
  return np.unique(np.round(np.linspace(0, num_timesteps - 1, count)).astype(np.int64))


def respace(diffusion: GaussianDiffusion, kept_timesteps: np.ndarray) -> GaussianDiffusion:
  """The diffusion on a subsequence of steps (module docstring): same abar at the kept steps."""
  kept = np.asarray(kept_timesteps, np.int64)
  if kept.ndim != 1 or not len(kept) or np.any(np.diff(kept) <= 0) or kept[0] < 0 or (
      kept[-1] >= diffusion.num_timesteps):
    raise ValueError(f"kept timesteps must be increasing indices in [0, "
                     f"{diffusion.num_timesteps}), got {kept}")
  alphas_cumprod = diffusion.alphas_cumprod[kept]
  betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
  return GaussianDiffusion.from_betas(betas, diffusion.timesteps[kept])


def _at(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] as float32, shaped [B, 1, ..., 1] to broadcast against an [B, ...] array."""
  picked = jnp.asarray(values, jnp.float32)[t]
  return picked.reshape(picked.shape + (1,) * (ndim - picked.ndim))


def _mean_over_dims(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


# --------------------------------------------------------------------------------------------
# Forward process and posterior
# --------------------------------------------------------------------------------------------
def q_sample(diffusion: GaussianDiffusion, x0: jax.Array, t: jax.Array, noise: jax.Array
             ) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
  abar = _at(diffusion.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior_mean_variance(diffusion: GaussianDiffusion, x0: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mu~_t, beta~_t, clipped log beta~_t) of q(x_{t-1} | x_t, x_0), broadcast to x's shape
  for the mean and [B, 1, ...] for the variances."""
  mean = (_at(diffusion.posterior_mean_coef1, t, x0.ndim) * x0
          + _at(diffusion.posterior_mean_coef2, t, x0.ndim) * x_t)
  return (mean, _at(diffusion.posterior_variance, t, x0.ndim),
          _at(diffusion.posterior_log_variance_clipped, t, x0.ndim))


def predict_x0_from_eps(diffusion: GaussianDiffusion, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
  abar = _at(diffusion.alphas_cumprod, t, x_t.ndim)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def predict_eps_from_x0(diffusion: GaussianDiffusion, x_t: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
  abar = _at(diffusion.alphas_cumprod, t, x_t.ndim)
  return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


# --------------------------------------------------------------------------------------------
# Reverse process
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReverseStep:
  """p(x_{t-1} | x_t) = N(mean, exp(log_variance)), with the x_0 and eps it came from."""

  mean: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array
  eps: jax.Array


def split_output(output: jax.Array, channels: int, learn_sigma: bool
                 ) -> tuple[jax.Array, jax.Array | None]:
  """The network output [..., C or 2C] -> (eps or velocity [..., C], variance values or None)."""
  expected = 2 * channels if learn_sigma else channels
  if output.shape[-1] != expected:
    raise ValueError(f"the network output has {output.shape[-1]} channels; expected {expected} "
                     f"for {channels}-channel images with learn_sigma={learn_sigma}")
  if learn_sigma:
    return output[..., :channels], output[..., channels:]
  return output, None


def model_log_variance(diffusion: GaussianDiffusion, variance_values: jax.Array | None,
                       t: jax.Array, ndim: int) -> jax.Array:
  """The reverse log variance: learned range (improved DDPM Eq. 15) or fixed_large."""
  if variance_values is None:
    fixed_large = np.log(np.append(diffusion.posterior_variance[1], diffusion.betas[1:])
                         if diffusion.num_timesteps > 1 else diffusion.betas)
    return _at(fixed_large, t, ndim)
  min_log = _at(diffusion.posterior_log_variance_clipped, t, ndim)
  max_log = _at(np.log(diffusion.betas), t, ndim)
  frac = (variance_values + 1.0) / 2.0
  return frac * max_log + (1.0 - frac) * min_log


def p_mean_variance(diffusion: GaussianDiffusion, output: jax.Array, x_t: jax.Array,
                    t: jax.Array, *, learn_sigma: bool, clip_denoised: bool = True
                    ) -> ReverseStep:
  """The reverse step from the network output at x_t (eps-prediction; module docstring)."""
  eps, variance_values = split_output(output, x_t.shape[-1], learn_sigma)
  log_variance = model_log_variance(diffusion, variance_values, t, x_t.ndim)
  pred_x0 = predict_x0_from_eps(diffusion, x_t, t, eps)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(diffusion, pred_x0, x_t, t)
  return ReverseStep(mean=mean, log_variance=jnp.broadcast_to(log_variance, x_t.shape),
                     pred_x0=pred_x0, eps=eps)


# --------------------------------------------------------------------------------------------
# The variational bound
# --------------------------------------------------------------------------------------------
def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
              ) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array
                                        ) -> jax.Array:
  """log P(x) elementwise (nats) of pixels x in [-1, 1] (256 levels) under N(mean, e^(2
  log_scale)) integrated over each pixel's bin [x - 1/255, x + 1/255]; the first bin extends to
  -infinity and the last to +infinity (DDPM Eq. 13). Uses the exact normal CDF."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (centered + _HALF_BIN)
  lower = inv_std * (centered - _HALF_BIN)
  # Difference of CDFs taken in the tail where it does not cancel: for a bin above the mean,
  # P = Phi(-lower) - Phi(-upper) (both small) instead of Phi(upper) - Phi(lower) (both ~1).
  delta = jnp.where(centered > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
  log_delta = jnp.log(jnp.maximum(delta, _PROB_FLOOR))
  return jnp.where(x < -0.999, log_ndtr(upper),
                   jnp.where(x > 0.999, log_ndtr(-lower), log_delta))


def vlb_term_bits(diffusion: GaussianDiffusion, step: ReverseStep, x0: jax.Array,
                  x_t: jax.Array, t: jax.Array) -> jax.Array:
  """L_t per example in bits/dim: the posterior KL for t >= 1, the decoder NLL for t = 0."""
  true_mean, _, true_log_variance = q_posterior_mean_variance(diffusion, x0, x_t, t)
  kl = _mean_over_dims(normal_kl(true_mean, true_log_variance, step.mean, step.log_variance))
  decoder_nll = -_mean_over_dims(
      discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance))
  return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)


def prior_bits(diffusion: GaussianDiffusion, x0: jax.Array) -> jax.Array:
  """L_T per example in bits/dim: KL(q(x_T | x_0) || N(0, I))."""
  last = jnp.full((x0.shape[0],), diffusion.num_timesteps - 1, jnp.int32)
  abar = _at(diffusion.alphas_cumprod, last, x0.ndim)
  kl = normal_kl(jnp.sqrt(abar) * x0, jnp.broadcast_to(jnp.log(1.0 - abar), x0.shape), 0.0, 0.0)
  return _mean_over_dims(kl) / math.log(2.0)


def ddpm_loss(diffusion: GaussianDiffusion, output: jax.Array, x0: jax.Array, x_t: jax.Array,
              t: jax.Array, noise: jax.Array, *, learn_sigma: bool, vlb_weight: float = 0.001
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example loss [B]: L_simple, plus lambda T L_t with the mean frozen when the variance is
  learned (improved DDPM's hybrid loss); also returns the terms {"mse", "vlb"} ([B] each; "vlb"
  is L_t in bits/dim, 0 without a learned variance)."""
  eps, variance_values = split_output(output, x0.shape[-1], learn_sigma)
  mse = _mean_over_dims((noise - eps) ** 2)
  if not learn_sigma:
    return mse, {"mse": mse, "vlb": jnp.zeros_like(mse)}
  # The bound trains only the variance: its mean is computed from a frozen eps (Sec. 3.1).
  frozen = jnp.concatenate([jax.lax.stop_gradient(eps), variance_values], axis=-1)
  step = p_mean_variance(diffusion, frozen, x_t, t, learn_sigma=True, clip_denoised=False)
  vlb = vlb_term_bits(diffusion, step, x0, x_t, t)
  return mse + vlb_weight * diffusion.num_timesteps * vlb, {"mse": mse, "vlb": vlb}


# --------------------------------------------------------------------------------------------
# DDPM and DDIM samplers
# --------------------------------------------------------------------------------------------
def _original_t(diffusion: GaussianDiffusion, i: jax.Array, batch: int) -> jax.Array:
  """The network's time input at index i: the original timestep, float32 [B]."""
  return jnp.full((batch,), jnp.asarray(diffusion.timesteps, jnp.float32)[i])


def _scan_reverse(step_fn: Callable[[jax.Array, jax.Array], jax.Array], x_T: jax.Array,
                  num_steps: int, return_trajectory: bool
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Runs x <- step_fn(x, i) for i = num_steps - 1 .. 0; the trajectory is [num_steps + 1, ...]
  (x_T first, the sample last)."""
  def body(x, i):
    x = step_fn(x, i)
    return x, (x if return_trajectory else None)

  x0, states = jax.lax.scan(body, x_T, jnp.arange(num_steps - 1, -1, -1))
  if not return_trajectory:
    return x0, None
  return x0, jnp.concatenate([x_T[None], states], axis=0)


def ddpm_sample(diffusion: GaussianDiffusion, net: Net, x_T: jax.Array, key: jax.Array, *,
                learn_sigma: bool, clip_denoised: bool = True, return_trajectory: bool = False
                ) -> tuple[jax.Array, jax.Array | None]:
  """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) over the diffusion's (respaced) steps, no noise
  at the last step. `net(x, t)` takes the original timesteps (float [B])."""
  batch = x_T.shape[0]

  def step(x, i):
    t = jnp.full((batch,), i, jnp.int32)
    out = p_mean_variance(diffusion, net(x, _original_t(diffusion, i, batch)), x, t,
                          learn_sigma=learn_sigma, clip_denoised=clip_denoised)
    z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return out.mean + jnp.where(i > 0, jnp.exp(0.5 * out.log_variance), 0.0) * z

  return _scan_reverse(step, x_T, diffusion.num_timesteps, return_trajectory)


def ddim_sample(diffusion: GaussianDiffusion, net: Net, x_T: jax.Array, key: jax.Array, *,
                learn_sigma: bool, eta: float = 0.0, clip_denoised: bool = True,
                return_trajectory: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """DDIM (module docstring) over the diffusion's (respaced) steps; eta = 0 is deterministic."""
  batch = x_T.shape[0]

  def step(x, i):
    t = jnp.full((batch,), i, jnp.int32)
    eps, _ = split_output(net(x, _original_t(diffusion, i, batch)), x.shape[-1], learn_sigma)
    pred_x0 = predict_x0_from_eps(diffusion, x, t, eps)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
      eps = predict_eps_from_x0(diffusion, x, t, pred_x0)
    abar = _at(diffusion.alphas_cumprod, t, x.ndim)
    abar_prev = _at(diffusion.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return (jnp.sqrt(abar_prev) * pred_x0
            + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps + sigma * z)

  return _scan_reverse(step, x_T, diffusion.num_timesteps, return_trajectory)


# --------------------------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------------------------
def _time_like(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


FLOW_TIME_SAMPLINGS = ("uniform", "logit_normal")


def flow_training_times(key: jax.Array, batch_size: int, method: str = "uniform") -> jax.Array:
  """The times t [B] in (0, 1) at which a flow-matching step trains.

  "uniform": t ~ U(0, 1) (rectified flow, SiT). "logit_normal": t = sigmoid(n), n ~ N(0, 1)
  (Esser et al. 2024, SD3's choice): more of the training goes to intermediate times, where the
  velocity is hardest to predict, less to the nearly clean and nearly pure-noise ends.
  """
  if method == "uniform":
    return jax.random.uniform(key, (batch_size,))
  if method == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(key, (batch_size,)))
  raise ValueError(f"unknown flow time sampling {method!r}; valid: "
                   f"{', '.join(FLOW_TIME_SAMPLINGS)}")


def flow_interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x_0 + t eps, t [B] in [0, 1] (0: data, 1: noise)."""
  t = _time_like(t, x0)
  return (1.0 - t) * x0 + t * noise


def flow_velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """dx_t / dt = eps - x_0."""
  return noise - x0


def flow_loss(velocity: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
  """Per-example |v_theta - (eps - x_0)|^2, mean over dimensions [B]."""
  return _mean_over_dims((velocity - flow_velocity_target(x0, noise)) ** 2)


def flow_sample(net: Net, x_1: jax.Array, *, num_steps: int, method: str = "euler",
                return_trajectory: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Integrates dx/dt = net(x, t) from t = 1 (x_1, noise) to t = 0 on a uniform grid of
  `num_steps` steps with "euler" or "heun" (trapezoid with an Euler predictor). `net(x, t)`
  takes t float [B] in [0, 1]. Returns (x_0, trajectory [num_steps + 1, ...] | None)."""
  if method not in FLOW_METHODS:
    raise ValueError(f"unknown flow sampler {method!r}; valid: {', '.join(FLOW_METHODS)}")
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  times = jnp.linspace(1.0, 0.0, num_steps + 1)
  batch = x_1.shape[0]

  def step(x, i):
    t, t_next = times[i], times[i + 1]
    dt = t_next - t
    velocity = net(x, jnp.full((batch,), t))
    if method == "euler":
      return x + dt * velocity
    predicted = x + dt * velocity
    return x + dt * 0.5 * (velocity + net(predicted, jnp.full((batch,), t_next)))

  def body(x, i):
    x = step(x, i)
    return x, (x if return_trajectory else None)

  x0, states = jax.lax.scan(body, x_1, jnp.arange(num_steps))
  if not return_trajectory:
    return x0, None
  return x0, jnp.concatenate([x_1[None], states], axis=0)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------
def classifier_free_guidance(cond: jax.Array, uncond: jax.Array, scale: float,
                             guided_channels: int) -> jax.Array:
  """cond + (s - 1)(cond - uncond) on the first `guided_channels` channels (eps or velocity);
  the remaining channels (a learned variance) are the conditional ones."""
  guided = cond[..., :guided_channels]
  guided = guided + (scale - 1.0) * (guided - uncond[..., :guided_channels])
  return jnp.concatenate([guided, cond[..., guided_channels:]], axis=-1)


def guided_net(net: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], labels: jax.Array,
               *, null_label: int, scale: float, guided_channels: int) -> Net:
  """`net(x, t, labels)` -> the guided `net(x, t)` for fixed `labels` [B]: one call on the batch
  doubled as (labels, null labels). Scale 1 is the conditional network alone (one call)."""
  if scale == 1.0:
    return lambda x, t: net(x, t, labels)

  def guided(x, t):
    both = net(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
               jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(both, 2)
    return classifier_free_guidance(cond, uncond, scale, guided_channels)

  return guided
