"""Every experiment config trains two steps at tiny sizes (the kauldron / flax train_test idea),
and the config machinery rejects what it does not know before any compute."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import paperzoo
from experiments import configs
from experiments import prerequisites
from paperzoo import config as config_lib
from paperzoo.registry import UnknownNameError
from tests.conftest import REPO_ROOT

CONFIG_NAMES = configs.names()
load_config = configs.load


def test_every_config_is_found():
  assert {"dlinear", "itransformer", "quickstart"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_trains_two_steps(name, tmp_path):
  config = load_config(name, "runlocal")
  config.train.plots = False
  # What `experiments.run` does: the runs the config reads first (VAR's tokenizer), then it.
  results = prerequisites.train(config, tmp_path, log=lambda _: None)
  assert results["status"] == "done"
  assert results["steps"] == 2
  for split in ("val", "test"):
    assert all(v == v and v < 1e3 for v in results[split].values()), results[split]
  assert json.loads((tmp_path / "results.json").read_text()) == results


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_docstring_shows_the_command(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  assert "python -m experiments.run" in module.__doc__
  assert f"experiments/configs/{name}.py" in module.__doc__


def test_parse_arg_types_and_switches():
  arg = config_lib.parse_arg("data=etth2,pred_len=192,runlocal", data="etth1", pred_len=96,
                             runlocal=False)
  assert (arg.data, arg.pred_len, arg.runlocal) == ("etth2", 192, True)
  with pytest.raises(ValueError, match="valid arguments: data, pred_len"):
    config_lib.parse_arg("horizon=3", data="etth1", pred_len=96)
  for bad in ("abc", "96.5", "True"):
    with pytest.raises(ValueError, match=f"pred_len='{bad}' is not an integer"):
      config_lib.parse_arg(f"pred_len={bad}", pred_len=96)
  assert config_lib.parse_arg("lr=3", lr=1e-3).lr == 3.0  # a float key takes an int
  assert config_lib.parse_arg("lr=2e-4", lr=1e-3).lr == 2e-4
  with pytest.raises(ValueError, match="lr='fast' is not a number"):
    config_lib.parse_arg("lr=fast", lr=1e-3)


def test_unknown_model_name_fails_before_compute_and_lists_valid_names(tmp_path):
  config = load_config("dlinear", "runlocal")
  config.model.name = "dlinaer"
  with pytest.raises(UnknownNameError, match="valid model names: .*dlinear.*itransformer"):
    paperzoo.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_unknown_data_name_lists_valid_names(tmp_path):
  config = load_config("dlinear", "runlocal")
  config.data.name = "etth3"
  with pytest.raises(UnknownNameError, match="valid data set names: .*etth1"):
    paperzoo.train_and_evaluate(config, tmp_path)


def test_missing_data_file_says_where_it_was_expected(tmp_path):
  config = load_config("dlinear", "runlocal")
  config.data.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "ett" / "ETTh1.csv")):
    paperzoo.train_and_evaluate(config, tmp_path / "run")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_config_key(tmp_path):
  result = _run_cli("--config=experiments/configs/dlinear.py:runlocal",
                    f"--workdir={tmp_path}", "--config.model.d_modle=3")
  assert result.returncode != 0
  assert "d_modle" in result.stderr


def test_cli_trains_with_overrides(tmp_path):
  result = _run_cli("--config=experiments/configs/dlinear.py:runlocal,pred_len=24",
                    f"--workdir={tmp_path}", "--config.model.moving_avg=13")
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["moving_avg"] == 13 and saved["data"]["pred_len"] == 24
  for name in ("results.json", "metrics.jsonl", "loss_curves.png", "forecasts.png"):
    assert (tmp_path / name).exists(), name
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
