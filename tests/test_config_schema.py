"""The config schema (`paperzoo.config.validate`): every experiment config and every config the
reproduction grids build passes it, each rule rejects a bad value with a one-line message that
names the key, the value and what is allowed, and a missing key gets its closest match. Loading
configs only: nothing here trains."""

from __future__ import annotations

import json

import pytest

from experiments import classification_grid
from experiments import configs
from experiments import forecasting_grid
from experiments import generation_grid
from paperzoo import config as config_lib
from paperzoo import optim

ConfigError = config_lib.ConfigError


def _with(config, **changes):
  """A fresh ConfigDict of `config` with dotted keys changed ("train__batch_size" style names:
  "__" for "."); a value of `_DELETE` removes the key. A fresh ConfigDict, because the one the
  config file built refuses a value of another type (a float for an int key), as a config built
  from a dict, or read back from JSON, does not."""
  tree = config.to_dict()
  for dotted, value in changes.items():
    *parents, last = dotted.split("__")
    node = tree
    for parent in parents:
      node = node[parent]
    if value is _DELETE:
      del node[last]
    else:
      node[last] = value
  return config_lib.ConfigDict(tree)


_DELETE = object()


def _message(config) -> str:
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert "\n" not in message
  return message


@pytest.fixture(name="config")
def _config():
  return configs.load("itransformer", "runlocal")


# ---------------------------------------------------------------------------------------------
# The schema itself.

def test_schema_lists_every_key_of_base_config_once():
  base = config_lib.flatten(json.loads(config_lib.base_config().to_json_best_effort()))
  assert list(config_lib.SCHEMA) == list(base)  # the same keys, in base_config()'s order


def test_base_config_fails_only_for_the_names_it_leaves_empty():
  message = _message(config_lib.base_config())
  assert message == ("task.name='': must be a non-empty string; data.name='': must be a "
                     "non-empty string; model.name='': must be a non-empty string")


def test_choices_come_from_the_code_that_reads_them():
  assert config_lib.SCHEMA["optimizer.name"].choices == optim.OPTIMIZERS
  assert config_lib.SCHEMA["optimizer.schedule"].choices == optim.SCHEDULES


def test_section_key_rules_by_name():
  rule = config_lib.section_key_rule
  assert rule("attention_dropout") == rule("dropout") == rule("class_dropout_prob")
  assert rule("attention_dropout").problem(1.0) == "must be in [0, 1)"
  assert rule("d_model").problem(0) == "must be >= 1"
  assert rule("t2t_heads").problem(0) == "must be >= 1"
  assert rule("num_heads").problem(0) is None  # DiT: 0 keeps the size's heads
  assert rule("mixup_alpha").problem(1.0) is None  # Beta(a, a): any a >= 0
  assert rule("embed_kernels").problem((7, 0)) == "must be a non-empty tuple of ints >= 1"
  assert rule("attention_impl") is None and rule("no_such_key") is None


# ---------------------------------------------------------------------------------------------
# Every config this project runs passes.

CONFIG_CASES = [(name, arg) for name in configs.names() for arg in (None, "runlocal")]


@pytest.mark.parametrize("name,arg", CONFIG_CASES,
                         ids=[f"{name}:{arg or 'default'}" for name, arg in CONFIG_CASES])
def test_every_experiment_config_validates(name, arg):
  config = configs.load(name, arg)
  config_lib.validate(config)
  # As a workdir's config.json reads back (`paperzoo.workdir.read_config`): tuples as lists.
  config_lib.validate(config_lib.ConfigDict(json.loads(config.to_json_best_effort())))


def _grid_runs(grid, tmp_path, fast):
  if grid is forecasting_grid:
    return forecasting_grid.runs(forecasting_grid.config_names(),
                                 list(forecasting_grid.PROTOCOL), seeds=1,
                                 workdir=tmp_path, fast=fast)
  return grid.runs(grid.entries([entry.key for entry in grid.ENTRIES]), seeds=1,
                   workdir=tmp_path, fast=fast)


@pytest.mark.parametrize("fast", [False, True], ids=["protocol", "fast"])
@pytest.mark.parametrize("grid", [forecasting_grid, classification_grid, generation_grid],
                         ids=["forecasting", "classification", "generation"])
def test_every_config_a_reproduction_grid_builds_validates(grid, fast, tmp_path):
  checked = 0
  for run in _grid_runs(grid, tmp_path, fast):
    try:
      config = run.config()
    except ValueError:  # a refused cell (a config without that data set or horizon)
      continue
    try:
      config_lib.validate(config)
    except ConfigError as error:
      pytest.fail(f"{run.config_arg}: {error}")
    checked += 1
  assert checked >= 10


def test_zero_stays_allowed_where_a_model_documents_it_as_the_default():
  # DiT: depth, hidden_size, num_heads 0 keep the size's values; VAR: depth, width, heads;
  # the VAR tokenizer: no residual blocks, no padding, never restart codes.
  config_lib.validate(_with(configs.load("dit", "runlocal"), model__depth=0,
                            model__hidden_size=0, model__num_heads=0))
  config_lib.validate(_with(configs.load("var", "runlocal"), model__depth=0, model__width=0,
                            model__heads=0, task__top_k=0, task__top_p=0.0))
  config_lib.validate(_with(configs.load("var_tokenizer", "runlocal"),
                            model__num_res_blocks=0, model__padded_size=0,
                            model__restart_after_steps=0))
  config_lib.validate(_with(configs.load("swin", "runlocal"), model__head_dim=0))


def test_a_plain_dict_validates_like_its_config_dict(config):
  config_lib.validate(config.to_dict())
  tree = config.to_dict()
  tree["optimizer"]["learning_rate"] = 0.0
  with pytest.raises(ConfigError, match=r"^optimizer.learning_rate=0.0: must be > 0$"):
    config_lib.validate(tree)


# ---------------------------------------------------------------------------------------------
# Each rule rejects a bad value, in one line: key, value, what is allowed.

BAD_VALUES = {
    "negative learning rate": (
        {"optimizer__learning_rate": -0.001}, "optimizer.learning_rate=-0.001: must be > 0"),
    "batch size 0": ({"train__batch_size": 0}, "train.batch_size=0: must be >= 1"),
    "negative epochs": ({"train__num_epochs": -1, "train__num_steps": 0},
                        "train.num_epochs=-1: must be >= 0"),
    "no epochs and no steps": (
        {"train__num_epochs": 0, "train__num_steps": 0},
        "train.num_epochs=0, train.num_steps=0: one of them must be > 0 (num_steps > 0 trains "
        "that many steps, else num_epochs epochs)"),
    "ema decay 1": ({"train__ema_decay": 1.0}, "train.ema_decay=1.0: must be in [0, 1)"),
    "b2 1.5": ({"optimizer__b2": 1.5}, "optimizer.b2=1.5: must be in [0, 1)"),
    "dropout 1.2": ({"model__dropout": 1.2}, "model.dropout=1.2: must be in [0, 1)"),
    "unknown optimizer": ({"optimizer__name": "lamb"},
                          "optimizer.name='lamb': must be one of 'adam', 'adamw', 'sgd'"),
    "unknown schedule": (
        {"optimizer__schedule": "linear"},
        "optimizer.schedule='linear': must be one of 'constant', 'cosine', 'step'"),
    "float for an int key": ({"train__batch_size": 8.0},
                             "train.batch_size=8.0: must be an int >= 1, not a float"),
    "bool for an int key": ({"train__log_every_steps": True},
                            "train.log_every_steps=True: must be an int >= 1, not a bool"),
    "bool for a float key": ({"optimizer__weight_decay": False},
                             "optimizer.weight_decay=False: must be a number >= 0, not a bool"),
    "string for a float key": ({"optimizer__eps": "1e-8"},
                               "optimizer.eps='1e-8': must be a number > 0"),
    "int for a bool key": ({"train__progress_bar": 1}, "train.progress_bar=1: must be a bool"),
    "two free mesh axes": ({"mesh__data": -1, "mesh__fsdp": -1},
                           "mesh.data=-1, mesh.fsdp=-1: at most one mesh axis may be -1 (it "
                           "takes the remaining devices)"),
    "mesh axis 0": ({"mesh__tensor": 0}, "mesh.tensor=0: must be -1 or >= 1"),
    "negative seed": ({"seed": -1}, "seed=-1: must be >= 0"),
    "tie break": ({"train__selection_tie_break": "earlier"},
                  "train.selection_tie_break='earlier': must be one of '', 'later', 'loss'"),
    "accumulation not dividing the batch": (
        {"train__grad_accum_steps": 3},
        "train.batch_size=8: must be a multiple of train.grad_accum_steps=3"),
    "decay rate 0": ({"optimizer__decay_rate": 0.0},
                     "optimizer.decay_rate=0.0: must be in (0, 1]"),
    "min lr ratio above 1": ({"optimizer__min_lr_ratio": 1.5},
                             "optimizer.min_lr_ratio=1.5: must be in [0, 1]"),
    "decay every 0 epochs": ({"optimizer__decay_every_epochs": 0},
                             "optimizer.decay_every_epochs=0: must be >= 1"),
    "bad no-decay pattern": (
        {"optimizer__no_decay_pattern": "(bias"},
        "optimizer.no_decay_pattern='(bias': must be a regular expression (missing ), "
        "unterminated subpattern at position 0)"),
    "sharding rule typo": (
        {"sharding_rules": (("embd", "fsdp"),)},
        "sharding_rules=(('embd', 'fsdp'),): entry 0: the logical axis 'embd' must be one of "
        "batch, embed, head_dim, heads, mlp, time, variates, vocab"),
    "sharding rule to a missing mesh axis": (
        {"sharding_rules": (("mlp", "model"),)},
        "sharding_rules=(('mlp', 'model'),): entry 0: 'model' must be a mesh axis (data, fsdp, "
        "tensor), a tuple of them or None"),
    "empty model name": ({"model__name": ""}, "model.name='': must be a non-empty string"),
    "d_model 0": ({"model__d_model": 0}, "model.d_model=0: must be >= 1"),
    "float d_model": ({"model__d_model": 16.5},
                      "model.d_model=16.5: must be an int >= 1, not a float"),
    "negative heads": ({"model__num_heads": -2}, "model.num_heads=-2: must be >= 0"),
    "seq_len 0": ({"data__seq_len": 0}, "data.seq_len=0: must be >= 1"),
    "bool use_norm": ({"model__use_norm": "yes"}, "model.use_norm='yes': must be a bool"),
    "unknown trainer key": ({"train__batchsize": 8},
                            "train.batchsize=8: unknown key, nothing reads it (closest: "
                            "batch_size)"),
    "missing trainer key": ({"optimizer__eps": _DELETE},
                            "optimizer.eps: missing (base_config() defines it; a number > 0)"),
}


@pytest.mark.parametrize("changes,expected", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_each_rule_rejects_a_bad_value_in_one_line(config, changes, expected):
  config_lib.validate(config)
  assert _message(_with(config, **changes)) == expected


@pytest.mark.parametrize("name,changes,expected", [
    ("vit", {"task__label_smoothing": 1.0}, "task.label_smoothing=1.0: must be in [0, 1)"),
    ("vit", {"task__mixup_alpha": -0.2}, "task.mixup_alpha=-0.2: must be >= 0"),
    ("vit", {"model__drop_path": 1.0}, "model.drop_path=1.0: must be in [0, 1)"),
    ("vit", {"data__val_fraction": 1.0}, "data.val_fraction=1.0: must be in [0, 1)"),
    ("vit", {"task__randaugment_magnitude": 31},
     "task.randaugment_magnitude=31: must be in [0, 30]"),
    ("swin", {"model__depths": ()}, "model.depths=(): must be a non-empty tuple of ints >= 0"),
    ("swin", {"model__dims": (32, 0)},
     "model.dims=(32, 0): must be a non-empty tuple of ints >= 1"),
    ("dit", {"model__class_dropout_prob": 1.0},
     "model.class_dropout_prob=1.0: must be in [0, 1)"),
    ("dit", {"task__eval_timesteps": 0}, "task.eval_timesteps=0: must be >= 1"),
    ("var", {"task__top_p": 1.5}, "task.top_p=1.5: must be in [0, 1]"),
    ("var", {"task__temperature": 0.0}, "task.temperature=0.0: must be > 0"),
    ("var_tokenizer", {"model__codebook_size": 1}, "model.codebook_size=1: must be >= 2"),
])
def test_free_form_sections_follow_the_rules_by_key_name(name, changes, expected):
  assert _message(_with(configs.load(name, "runlocal"), **changes)) == expected


def test_every_problem_is_reported_on_one_line(config):
  error_config = _with(config, optimizer__learning_rate=-1.0, train__batch_size=0,
                       model__dropout=1.5)
  with pytest.raises(ConfigError) as error:
    config_lib.validate(error_config)
  assert error.value.problems == ["train.batch_size=0: must be >= 1",
                                  "optimizer.learning_rate=-1.0: must be > 0",
                                  "model.dropout=1.5: must be in [0, 1)"]
  assert str(error.value) == "; ".join(error.value.problems)
  assert isinstance(error.value, ValueError)


# ---------------------------------------------------------------------------------------------
# unknown_key_message: one line, the section's keys, the closest match.

def test_unknown_key_message_names_the_closest_key(config):
  keys = ", ".join(sorted(config.model.keys()))
  assert config_lib.unknown_key_message(config, "model.d_modle") == (
      f"unknown key model.d_modle; keys of config.model: {keys}; closest: d_model")
  assert config_lib.unknown_key_message(config, "optimizer.lerning_rate").endswith(
      "; closest: learning_rate")
  assert config_lib.unknown_key_message(config, "train.batchsize").endswith(
      "; closest: batch_size, eval_batch_size")
  assert config_lib.unknown_key_message(config, "model.no_such_key").endswith(
      "; no close match")


def test_unknown_key_message_for_a_missing_section(config):
  assert config_lib.unknown_key_message(config, "modle.d_model") == (
      "unknown key modle.d_model: config has no section modle; keys of config: data, mesh, "
      "model, optimizer, seed, sharding_rules, task, train; closest: model")
  assert config_lib.unknown_key_message(config, "model.encoder.d_model").startswith(
      "unknown key model.encoder.d_model: config.model has no section encoder; keys of "
      "config.model: ")
  assert config_lib.unknown_key_message(config, "seed.value") == (
      "unknown key seed.value: seed=2021 is a value, not a section")
  for key in ("model.d_modle", "modle.d_model", "seed.value", "x"):
    assert "\n" not in config_lib.unknown_key_message(config, key)
