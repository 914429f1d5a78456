"""The diffusion / flow-matching math of paperzoo.generation.diffusion against closed forms
written out independently here (numpy and math.erf only)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperzoo.generation import diffusion as D

T = 1000


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Test inputs from numpy (eager jax.random calls each compile a kernel: seconds on CPU)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _uniform(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


@pytest.fixture(scope="module")
def base():
  return D.GaussianDiffusion.from_betas(D.linear_betas(T))


def test_linear_betas_are_ddpms_and_scale_with_T():
  betas = D.linear_betas(1000)
  assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
  # Improved DDPM's scaling keeps the schedule's total noise roughly fixed.
  assert D.linear_betas(100)[-1] == pytest.approx(0.2)
  with pytest.raises(ValueError, match="num_timesteps"):
    D.linear_betas(0)


def test_q_sample_has_the_forward_marginal(base):
  t_index = 300
  abar = np.prod(1.0 - base.betas[:t_index + 1])
  x0 = jnp.full((20_000, 1), 0.7)
  noise = _normal(0, x0.shape)
  x_t = np.asarray(D.q_sample(base, x0, jnp.full((20_000,), t_index), noise))
  assert x_t.mean() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
  assert x_t.var() == pytest.approx(1.0 - abar, rel=0.03)


def test_posterior_is_bayes_rule(base):
  # q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0): the product of two Gaussians in
  # x_{t-1}, precision alpha_t / beta_t + 1 / (1 - abar_{t-1}).
  rng = np.random.default_rng(0)
  t = np.array([1, 10, 500, 999])
  x0 = rng.normal(size=(4, 3))
  x_t = rng.normal(size=(4, 3))
  mean, variance, log_variance = D.q_posterior_mean_variance(
      base, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  beta = base.betas[t][:, None]
  abar_prev = np.cumprod(1.0 - base.betas)[t - 1][:, None]
  precision = (1.0 - beta) / beta + 1.0 / (1.0 - abar_prev)
  expected_variance = 1.0 / precision
  expected_mean = expected_variance * (np.sqrt(1.0 - beta) * x_t / beta
                                       + np.sqrt(abar_prev) * x0 / (1.0 - abar_prev))
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(variance, expected_variance, rtol=1e-4)
  np.testing.assert_allclose(log_variance, np.log(expected_variance), rtol=1e-4)


def test_normal_kl_matches_the_closed_form():
  m1, s1, m2, s2 = 0.3, 0.5, -0.2, 1.7
  expected = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
  kl = D.normal_kl(jnp.float32(m1), jnp.float32(2 * math.log(s1)), jnp.float32(m2),
                   jnp.float32(2 * math.log(s2)))
  assert float(kl) == pytest.approx(expected, rel=1e-5)
  assert float(D.normal_kl(1.0, 0.3, 1.0, 0.3)) == pytest.approx(0.0, abs=1e-7)


def _phi(z: float) -> float:
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_discretized_likelihood_matches_bin_probabilities():
  levels = np.arange(256) / 127.5 - 1.0  # the 256 pixel values in [-1, 1]
  mean, log_scale = 0.1, math.log(0.3)
  log_p = np.asarray(D.discretized_gaussian_log_likelihood(
      jnp.asarray(levels, jnp.float32), jnp.float32(mean), jnp.float32(log_scale)))
  # The bins partition the real line, so the probabilities sum to one.
  assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-4)
  sigma = 0.3
  for i in (0, 40, 127, 200, 255):
    x = levels[i]
    upper = 1.0 if i == 255 else _phi((x + 1 / 255 - mean) / sigma)
    lower = 0.0 if i == 0 else _phi((x - 1 / 255 - mean) / sigma)
    assert log_p[i] == pytest.approx(math.log(upper - lower), rel=1e-3), i


def test_respacing_keeps_alpha_bar_at_kept_steps(base):
  kept = D.spaced_timesteps(T, 50)
  assert kept[0] == 0 and kept[-1] == T - 1 and len(kept) == 50
  spaced = D.respace(base, kept)
  np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
  np.testing.assert_array_equal(spaced.timesteps, kept)
  with pytest.raises(ValueError, match="increasing"):
    D.respace(base, np.array([5, 3]))


def test_learned_range_interpolates_between_beta_and_beta_tilde(base):
  t = jnp.array([5, 600])
  ends = [D.model_log_variance(base, jnp.full((2, 1), v), t, 2) for v in (1.0, -1.0)]
  np.testing.assert_allclose(ends[0][:, 0], np.log(base.betas[[5, 600]]), rtol=1e-5)
  np.testing.assert_allclose(ends[1][:, 0], base.posterior_log_variance_clipped[[5, 600]],
                             rtol=1e-5)


def test_hybrid_loss_trains_the_variance_only_through_the_bound(base):
  x0 = _uniform(1, (4, 4, 4, 1))
  noise = _normal(2, x0.shape)
  t = jnp.array([0, 3, 200, 999])
  x_t = D.q_sample(base, x0, t, noise)
  output = 0.1 * _normal(3, (4, 4, 4, 2))

  def vlb_part(out):
    loss, terms = D.ddpm_loss(base, out, x0, x_t, t, noise, learn_sigma=True)
    return jnp.sum(loss - terms["mse"]), (loss, terms)

  grad, (loss, terms) = jax.jit(jax.grad(vlb_part, has_aux=True))(output)
  np.testing.assert_allclose(loss, terms["mse"] + 0.001 * T * terms["vlb"], rtol=1e-6)
  assert float(jnp.abs(grad[..., 0]).max()) == 0.0  # stop-gradient on the mean
  assert float(jnp.abs(grad[..., 1]).max()) > 0.0


def test_ddim_with_the_true_noise_reconstructs_x0(base):
  x0 = _uniform(4, (3, 4, 4, 1))

  def oracle(x, t):  # the exact noise of x = q_sample(x0, t, eps), at the original timestep t
    abar = jnp.asarray(base.alphas_cumprod, jnp.float32)[t.astype(jnp.int32)][:, None, None, None]
    return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)

  spaced = D.respace(base, D.spaced_timesteps(T, 20))
  x_T = _normal(5, x0.shape)
  sample = jax.jit(lambda x: D.ddim_sample(spaced, oracle, x, jax.random.key(4),
                                           learn_sigma=False, eta=0.0, return_trajectory=True))
  result, trajectory = sample(x_T)
  np.testing.assert_allclose(result, x0, atol=1e-4)
  assert trajectory.shape == (21,) + x0.shape
  np.testing.assert_array_equal(trajectory[0], x_T)


def test_ddpm_sampler_with_the_true_noise_of_a_point_mass_lands_on_it(base):
  # Data = one point c: the true eps of x_t is (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t), every
  # reverse mean is the exact posterior mean, and the last step (no noise) returns mu~_0 = c,
  # whatever the (learned) variances and the noise drawn on the way.
  point = _uniform(8, (1, 4, 4, 1))

  def oracle(x, t):
    abar = jnp.asarray(base.alphas_cumprod, jnp.float32)[t.astype(jnp.int32)][:, None, None, None]
    eps = (x - jnp.sqrt(abar) * point) / jnp.sqrt(1.0 - abar)
    return jnp.concatenate([eps, jnp.full_like(eps, 0.3)], axis=-1)  # eps, variance values

  spaced = D.respace(base, D.spaced_timesteps(T, 10))
  result, trajectory = jax.jit(lambda x: D.ddpm_sample(
      spaced, oracle, x, jax.random.key(0), learn_sigma=True, return_trajectory=True))(
          _normal(9, (2, 4, 4, 1)))
  np.testing.assert_allclose(result, jnp.broadcast_to(point, (2, 4, 4, 1)), atol=1e-5)
  assert trajectory.shape == (11, 2, 4, 4, 1)


def test_flow_euler_with_the_exact_velocity_lands_on_a_point_mass():
  target = jnp.array([[0.5, -1.5, 2.0]])
  # For x_t = (1 - t) x* + t eps, the velocity eps - x* given x_t is (x_t - x*) / t.
  net = lambda x, t: (x - target) / t[:, None]  # noqa: E731
  x_1 = _normal(6, (1, 3))
  result, trajectory = D.flow_sample(net, x_1, num_steps=7, method="euler",
                                     return_trajectory=True)
  np.testing.assert_allclose(result, target, atol=1e-5)
  assert trajectory.shape == (8, 1, 3)


def test_heun_integrates_a_linear_in_time_velocity_exactly():
  # dx/dt = a t from t = 1 to 0: x(0) = x(1) - a / 2. Trapezoid is exact, Euler is not.
  a = jnp.array([[2.0, -1.0]])
  net = lambda x, t: a * t[:, None]  # noqa: E731
  x_1 = jnp.zeros((1, 2))
  heun, _ = D.flow_sample(net, x_1, num_steps=3, method="heun")
  euler, _ = D.flow_sample(net, x_1, num_steps=3, method="euler")
  np.testing.assert_allclose(heun, -a / 2, atol=1e-6)
  assert float(jnp.abs(euler + a / 2).max()) > 0.1
  with pytest.raises(ValueError, match="valid: euler, heun"):
    D.flow_sample(net, x_1, num_steps=3, method="rk4")


def test_flow_loss_is_zero_for_the_true_velocity():
  x0 = jnp.ones((2, 3))
  noise = jnp.arange(6.0).reshape(2, 3)
  x_t = D.flow_interpolate(x0, noise, jnp.array([0.25, 1.0]))
  np.testing.assert_allclose(x_t[1], noise[1])
  np.testing.assert_allclose(D.flow_loss(noise - x0, x0, noise), 0.0)


def test_guidance_at_scale_one_is_the_conditional_output():
  def net(x, t, labels):  # the output depends on the label, so cond != uncond
    return jnp.concatenate([x + labels[:, None, None, None], x * 0 + 7.0], axis=-1)

  x = _normal(7, (3, 2, 2, 1))
  t = jnp.zeros((3,))
  labels = jnp.array([1, 2, 3])
  cond = net(x, t, labels)
  uncond = net(x, t, jnp.full((3,), 10))
  np.testing.assert_array_equal(D.classifier_free_guidance(cond, uncond, 1.0, 1), cond)
  np.testing.assert_array_equal(
      D.guided_net(net, labels, null_label=10, scale=1.0, guided_channels=1)(x, t), cond)
  guided = D.guided_net(net, labels, null_label=10, scale=3.0, guided_channels=1)(x, t)
  np.testing.assert_allclose(guided[..., :1], uncond[..., :1] + 3.0 * (cond - uncond)[..., :1],
                             rtol=1e-6)
  np.testing.assert_array_equal(guided[..., 1:], cond[..., 1:])  # the variance is not guided


def test_bits_per_dim_terms_are_positive_and_prior_is_small(base):
  x0 = jnp.linspace(-1, 1, 32).reshape(2, 4, 4, 1)
  assert float(D.prior_bits(base, x0).max()) < 1e-3  # abar_T ~ 4e-5: q(x_T) ~ N(0, I)

  @jax.jit
  def terms(x0):
    step = D.p_mean_variance(base, jnp.zeros((2, 4, 4, 1)), x0, jnp.array([0, 10]),
                             learn_sigma=False, clip_denoised=False)
    return D.vlb_term_bits(base, step, x0, x0, jnp.array([0, 10]))

  assert bool(jnp.all(terms(x0) >= 0))


def test_flow_training_times_follow_their_distributions():
  key = jax.random.key(3)
  uniform = np.asarray(D.flow_training_times(key, 20_001, "uniform"))
  logit_normal = np.asarray(D.flow_training_times(key, 20_001, "logit_normal"))
  assert uniform.shape == logit_normal.shape == (20_001,)
  assert 0 < uniform.min() and uniform.max() < 1 and 0 < logit_normal.min()
  assert logit_normal.max() < 1
  # logit(t) ~ N(0, 1): mean 0, std 1; so P(|logit t| < 1) = 68%, against 46% for U(0, 1).
  logits = np.log(logit_normal) - np.log1p(-logit_normal)
  assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
  central = lambda t: np.mean(np.abs(np.log(t) - np.log1p(-t)) < 1)
  assert central(logit_normal) == pytest.approx(0.6827, abs=0.01)
  assert central(uniform) == pytest.approx(2 * (1 / (1 + math.e ** -1)) - 1, abs=0.01)
  with pytest.raises(ValueError, match="valid: uniform, logit_normal"):
    D.flow_training_times(key, 4, "beta")
