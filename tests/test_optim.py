"""Learning-rate schedules and optimizers from config."""

from __future__ import annotations

import jax
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


def tslib_epoch_rates(lr: float, lradj: str, epochs: int) -> list[float]:
  """Time-Series-Library's `adjust_learning_rate(optimizer, epoch + 1, args)`, called after
  each epoch: the rate each epoch trains at (the first at `lr`)."""
  rates = [lr]
  for epoch in range(epochs - 1):
    e = epoch + 1  # what the training loop passes
    if lradj == "type1":
      rates.append(lr * 0.5 ** ((e - 1) // 1))
    elif lradj == "type3":  # PatchTST's
      rates.append(lr if e < 3 else lr * 0.9 ** ((e - 3) // 1))
  return rates


@pytest.mark.parametrize("lradj, decay_rate, decay_start_epoch",
                         [("type1", 0.5, 1), ("type3", 0.9, 3)])
def test_step_schedule_is_tslib_lradj(lradj, decay_rate, decay_start_epoch):
  schedule = optim.make_schedule(
      opt_config(learning_rate=1e-3, schedule="step", decay_rate=decay_rate,
                 decay_start_epoch=decay_start_epoch), total_steps=80, steps_per_epoch=10)
  lrs = np.array([schedule(s) for s in range(80)]).reshape(8, 10)
  np.testing.assert_allclose(lrs, np.repeat(np.array(tslib_epoch_rates(1e-3, lradj, 8))[:, None],
                                            10, axis=1), rtol=1e-6)


def test_step_schedule_from_the_first_epoch_and_every_two():
  schedule = optim.make_schedule(opt_config(learning_rate=1.0, schedule="step",
                                            decay_every_epochs=2), total_steps=60,
                                 steps_per_epoch=10)
  np.testing.assert_allclose([schedule(s) for s in (0, 19, 20, 39, 40, 59)],
                             [1, 1, 0.5, 0.5, 0.25, 0.25], rtol=1e-6)
  with pytest.raises(ValueError, match="decay_start_epoch=-1"):
    optim.make_schedule(opt_config(schedule="step", decay_start_epoch=-1), total_steps=10,
                        steps_per_epoch=5)


def test_the_forecasting_protocol_uses_tslib_type1():
  from experiments.configs import dlinear  # pylint: disable=g-import-not-at-top
  opt = dlinear.get_config("").optimizer
  schedule = optim.make_schedule(opt, total_steps=50, steps_per_epoch=5)
  np.testing.assert_allclose([schedule(5 * e) for e in range(10)],
                             tslib_epoch_rates(opt.learning_rate, "type1", 10), rtol=1e-6)


def test_warmup_then_cosine_reaches_the_floor():
  schedule = optim.make_schedule(
      opt_config(learning_rate=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1),
      total_steps=111, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, rel=1e-5)  # half-way down the cosine
  assert float(schedule(110)) == pytest.approx(0.1, rel=1e-5)  # the last step: the floor


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


def _decay_updates(name: str, **overrides) -> dict[str, np.ndarray]:
  """One step of the optimizer on zero gradients: what weight decay alone does to each
  parameter (all ones) at learning rate 0.1 and weight decay 0.5."""
  opt = opt_config(name=name, learning_rate=0.1, weight_decay=0.5, **overrides)
  tx = optim.make_optimizer(opt, optim.make_schedule(opt, total_steps=10, steps_per_epoch=5))
  params = {"positions": jnp.ones((4, 3)), "head": {"kernel": jnp.ones((3, 2)),
                                                   "bias": jnp.ones((2,))},
            "blocks": [{"relative_position_bias": jnp.ones((9, 2)),
                        "mlp": {"kernel": jnp.ones((3, 3))}}]}
  zero = {"positions": jnp.zeros((4, 3)), "head": {"kernel": jnp.zeros((3, 2)),
                                                   "bias": jnp.zeros((2,))},
          "blocks": [{"relative_position_bias": jnp.zeros((9, 2)),
                      "mlp": {"kernel": jnp.zeros((3, 3))}}]}
  updates, _ = tx.update(zero, tx.init(params), params)
  flat = {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(u)
          for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  return {name: float(np.abs(u).max()) for name, u in flat.items()}


def test_weight_decay_spares_vectors_and_named_parameters():
  everything = _decay_updates("adamw")
  assert everything == pytest.approx({"positions": 0.05, "head/kernel": 0.05, "head/bias": 0.05,
                                      "blocks/0/relative_position_bias": 0.05,
                                      "blocks/0/mlp/kernel": 0.05})
  spared = _decay_updates("adamw", decay_vectors=False,
                          no_decay_pattern="positions|relative_position_bias")
  assert spared == pytest.approx({"positions": 0.0, "head/kernel": 0.05, "head/bias": 0.0,
                                  "blocks/0/relative_position_bias": 0.0,
                                  "blocks/0/mlp/kernel": 0.05})
  # The L2 penalty of adam(weight_decay=...) follows the same mask: spared parameters see a
  # zero gradient, the others Adam's first step of size learning_rate.
  l2 = _decay_updates("adam", decay_vectors=False, no_decay_pattern="^positions$")
  assert l2 == pytest.approx({"positions": 0.0, "head/kernel": 0.1, "head/bias": 0.0,
                              "blocks/0/relative_position_bias": 0.1,
                              "blocks/0/mlp/kernel": 0.1}, rel=1e-4)


def test_weight_decay_pattern_must_be_a_regular_expression():
  with pytest.raises(ValueError, match=r"no_decay_pattern='\(positions' is no regular"):
    optim.make_optimizer(opt_config(name="adamw", no_decay_pattern="(positions"),
                         optax.constant_schedule(1e-3))


def _decays_by_name(config, **model_kwargs) -> dict[str, bool]:
  """Whether each parameter of `config`'s model decays, keyed by its path. The trainer builds
  the optimizer state on the nnx.Param variables and updates it on plain arrays: both must
  get the same mask."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from paperzoo.registry import MODELS  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: MODELS.get(config.model.name)(
      config.model, **model_kwargs, rngs=nnx.Rngs(params=0)))
  variables = nnx.state(model, nnx.Param)
  mask = optim.weight_decay_mask(config.optimizer)
  decays = mask(nnx.to_pure_dict(variables))
  assert jax.tree.leaves(mask(variables)) == jax.tree.leaves(decays)
  return {jax.tree_util.keystr(path, simple=True, separator="/"): bool(d)
          for path, d in jax.tree_util.tree_flatten_with_path(decays)[0]}


@pytest.mark.parametrize("config_name", ["vit", "swin", "agent", "poolformer"])
def test_cifar10_recipe_spares_what_deit_and_swin_spare(config_name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"experiments.configs.{config_name}").get_config(
      "data=cifar10")
  by_name = _decays_by_name(config, num_classes=10, input_shape=(32, 32, 3), vocab_size=None)
  assert 0 < sum(by_name.values()) < len(by_name)
  for name, d in by_name.items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("bias", "scale", "positions", "class_token", "relative_position_bias",
                "agent_bias", "query_bias", "layer_scales"):
      assert not d, name
    elif leaf == "kernel":
      assert d, name


def test_lra_mamba_spares_a_log_and_d_only():
  from experiments.configs import lra  # pylint: disable=g-import-not-at-top
  config = lra.get_config("task=listops,mixer=mamba,size=cpu")
  by_name = _decays_by_name(config, num_classes=10, input_shape=(256,), vocab_size=20)
  spared = {name.rsplit("/", 1)[-1] for name, d in by_name.items() if not d}
  assert spared == {"A_log", "D"}
  assert sum(not d for d in by_name.values()) == 2 * sum(n.endswith("/A_log") for n in by_name)
