"""Learning-rate schedules and optimizers from config."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paperzoo import config as config_lib
from paperzoo import optim


def opt_config(**overrides):
  opt = config_lib.base_config().optimizer
  opt.update(overrides)
  return opt


def test_step_schedule_halves_every_epoch_like_tslib_type1():
  # TSLib lradj=type1: epoch e (from 0) trains at lr * 0.5**e.
  schedule = optim.make_schedule(opt_config(learning_rate=1e-3, schedule="step"),
                                 total_steps=40, steps_per_epoch=10)
  lrs = np.array([schedule(s) for s in range(40)])
  np.testing.assert_allclose(lrs[[0, 9, 10, 19, 20, 39]],
                             [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 1.25e-4], rtol=1e-6)


def test_warmup_then_cosine_reaches_the_floor():
  schedule = optim.make_schedule(
      opt_config(learning_rate=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1),
      total_steps=110, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, rel=1e-5)  # half-way down the cosine
  assert float(schedule(110)) == pytest.approx(0.1, rel=1e-5)


def test_clipping_and_l2_weight_decay_change_the_update():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([30.0, 40.0])}  # norm 50
  sgd = lambda **kw: optim.make_optimizer(opt_config(name="sgd", b1=0.0, **kw),
                                          optax.constant_schedule(1.0))
  clipped = sgd(grad_clip_norm=5.0)
  updates, _ = clipped.update(grads, clipped.init(params), params)
  np.testing.assert_allclose(updates["w"], [-3.0, -4.0], rtol=1e-6)
  decayed = sgd(weight_decay=0.5)
  updates, _ = decayed.update(grads, decayed.init(params), params)
  np.testing.assert_allclose(updates["w"], [-30.5, -39.0], rtol=1e-6)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="adam, adamw, sgd"):
    optim.make_optimizer(opt_config(name="lion"), optax.constant_schedule(1.0))
  with pytest.raises(ValueError, match="constant, cosine, step"):
    optim.make_schedule(opt_config(schedule="linear"), total_steps=1, steps_per_epoch=1)
