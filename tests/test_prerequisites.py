"""Runs that read other runs: the library reads finished runs and refuses missing ones (naming
the workdir and the command); `experiments.run` trains what a config needs first, once, however
many processes ask. Also: the layers point one way (no `paperzoo` module imports `experiments`)
and data sets know their kind (a new one joins a task without any list being edited)."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import paperzoo
from experiments import configs
from experiments import prerequisites
from paperzoo import registry
from paperzoo import workdir as workdir_lib
from paperzoo.data import classification as classification_data
from paperzoo.registry import DATASETS, TASKS
from tests.conftest import REPO_ROOT


def var_config(tokenizer_workdir: pathlib.Path):
  config = configs.load("var", "runlocal")
  config.task.tokenizer_workdir = str(tokenizer_workdir)
  return config


# ---------------------------------------------------------------------------------------------
# The library reads; the experiment layer trains.

def test_the_library_refuses_a_run_whose_prerequisite_is_missing(tmp_path):
  config = var_config(tmp_path / "tokenizer")
  config.task.update(samples_per_class=2, reference_workdir=str(tmp_path / "reference"))
  with pytest.raises(workdir_lib.MissingRunError) as error:
    paperzoo.train_and_evaluate(config, tmp_path / "var")
  message = str(error.value)
  assert f"VAR tokenizer in {tmp_path / 'tokenizer'} has not finished" in message
  assert (f"python -m experiments.run --workdir={tmp_path / 'tokenizer'} "
          "--config=experiments/configs/var_tokenizer.py:data=mnist,seed=2021,runlocal"
          in message)
  assert not (tmp_path / "var").exists()  # refused before anything was written

  # What experiments.run would train first, in order, each with the config that trains it.
  needed = prerequisites.prerequisites(config)
  assert [p.workdir for p in needed] == [tmp_path / "tokenizer", tmp_path / "reference"]
  assert [p.config.model.name for p in needed] == ["var_tokenizer", "reference_cnn"]
  assert needed[0].config.seed == 2021 and needed[0].config.train.num_steps == 2


@pytest.mark.slow  # trains a tokenizer, then VAR and DiT on it: most of a minute
def test_experiments_run_trains_what_var_and_dit_need_first(tmp_path):
  """Two command lines, side by side: VAR (its tokenizer is missing) and DiT scoring samples
  (its reference classifier is missing); each trains its prerequisite, then itself."""
  commands = {
      "var": ["--config=experiments/configs/var.py:runlocal",
              f"--config.task.tokenizer_workdir={tmp_path / 'tokenizer'}"],
      "dit": ["--config=experiments/configs/dit.py:runlocal",
              "--config.task.samples_per_class=2", "--config.task.sample_batch_size=20",
              f"--config.task.reference_workdir={tmp_path / 'reference'}"],
  }
  processes = {
      name: subprocess.Popen(
          [sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / name}", *args,
           "--config.train.plots=False"],
          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for name, args in commands.items()}
  outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
  for name, process in processes.items():
    assert process.returncode == 0, outputs[name][-3000:]
  assert "training the VAR tokenizer first" in outputs["var"]
  assert "training the reference classifier first" in outputs["dit"]
  for name in ("tokenizer", "reference", "var", "dit"):
    assert workdir_lib.is_done(tmp_path / name), name
  assert workdir_lib.read_config(tmp_path / "tokenizer").model.name == "var_tokenizer"
  dit = json.loads((tmp_path / "dit" / "results.json").read_text())
  assert dit["final_metrics"]["num_samples"] == 20  # scored by the reference classifier
  assert 0.0 <= dit["final_metrics"]["class_accuracy"] <= 1.0


_TRAIN_ONCE = textwrap.dedent("""
    import json, os, pathlib, sys, time
    from experiments import configs, prerequisites

    tokenizer, calls = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    config = configs.load("var", "runlocal")
    config.task.tokenizer_workdir = str(tokenizer)

    def train(config, workdir):  # stands in for the trainer: slow enough to overlap
      with open(calls, "a") as stream:
        stream.write(f"{os.getpid()} {workdir}\\n")
      time.sleep(2)
      (workdir / "config.json").write_text(config.to_json_best_effort())
      (workdir / "results.json").write_text(json.dumps({"status": "done"}))
      return {"status": "done"}

    prerequisites.train_prerequisites(config, train_fn=train, log=lambda _: None)
    print("ready", flush=True)
""")


def test_two_processes_needing_one_prerequisite_train_it_once(tmp_path):
  args = [sys.executable, "-c", _TRAIN_ONCE, str(tmp_path / "tokenizer"),
          str(tmp_path / "calls.txt")]
  processes = [subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [process.communicate(timeout=300) for process in processes]
  for process, (out, err) in zip(processes, results):
    assert process.returncode == 0, err[-3000:]
    assert out.strip() == "ready"  # the waiting one returned too, once the run had finished
  (line,) = (tmp_path / "calls.txt").read_text().splitlines()
  assert line.endswith(str(tmp_path / "tokenizer"))
  assert workdir_lib.is_done(tmp_path / "tokenizer")


def test_a_failed_prerequisite_is_recorded_in_its_workdir_and_named(tmp_path):
  def failing(config, workdir):
    raise RuntimeError("no space left")

  config = var_config(tmp_path / "tokenizer")
  with pytest.raises(prerequisites.PrerequisiteError,
                     match=f"VAR tokenizer this run needs failed to train in "
                           f"{tmp_path / 'tokenizer'}.*no space left"):
    prerequisites.train(config, tmp_path / "var", train_fn=failing, log=lambda _: None)
  error = (tmp_path / "tokenizer" / "error.txt").read_text()
  assert error.startswith("python -m experiments.run --workdir=") and "no space left" in error
  assert not (tmp_path / "var").exists()


# ---------------------------------------------------------------------------------------------
# One direction of dependency.

def _imported_modules(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at the top or inside a function."""
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


@pytest.mark.parametrize("package, forbidden", [("paperzoo", ("experiments",)),
                                                ("pallas_kernels", ("experiments", "paperzoo"))])
def test_the_layers_point_one_way(package, forbidden):
  offending = {}
  for path in sorted((REPO_ROOT / package).rglob("*.py")):
    bad = sorted(name for name in _imported_modules(path)
                 if name.split(".")[0] in forbidden)
    if bad:
      offending[str(path.relative_to(REPO_ROOT))] = bad
  assert not offending, f"{package} must not import {forbidden}: {offending}"


def test_importing_every_paperzoo_module_loads_nothing_of_experiments():
  script = textwrap.dedent("""
      import importlib, pkgutil, sys
      import paperzoo
      for module in pkgutil.walk_packages(paperzoo.__path__, "paperzoo."):
        if not module.name.endswith("__main__"):
          importlib.import_module(module.name)
      print(sorted(m for m in sys.modules if m.split(".")[0] == "experiments"))
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Data sets know their kind.

def test_every_data_set_and_task_names_a_known_kind():
  for name in DATASETS.names():
    assert DATASETS.kind(name) in registry.DATA_KINDS, name
  for name in TASKS.names():
    kinds = TASKS.get(name).data_kinds
    assert kinds and set(kinds) <= set(registry.DATA_KINDS), name
  assert DATASETS.names(["image"]) == ["cifar10", "mnist"]
  assert "etth1" in DATASETS.names(["forecasting"])
  with pytest.raises(ValueError, match="unknown kind 'pictures'; valid kinds: forecasting"):
    DATASETS.register("x", kind="pictures")


def test_a_new_data_set_joins_every_task_of_its_kind_through_its_registration(monkeypatch):
  rng = np.random.default_rng(0)

  def split(n):
    return classification_data.ArraySplit({
        "inputs": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
        "label": np.arange(n, dtype=np.int32) % 3})

  def load_tiny_digits(data):
    del data
    return classification_data.ClassificationData(
        name="tiny_digits", kind="image", train=split(12), val=split(6), test=split(6),
        class_names=("a", "b", "c"))

  # Registered as a new module would register it, and removed again after the test.
  # pylint: disable=protected-access
  monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
  monkeypatch.setattr(DATASETS, "_kinds", dict(DATASETS._kinds))
  # pylint: enable=protected-access
  DATASETS.register("tiny_digits", kind="image")(load_tiny_digits)

  config = configs.load("dit", "runlocal")
  config.data.name = "tiny_digits"
  config.task.image_size = 8
  task = TASKS.get("diffusion")(config)
  assert task.num_classes == 3 and task.image_shape == (8, 8, 1)
  config = configs.load("var_tokenizer", "runlocal")
  config.data.name = "tiny_digits"
  assert TASKS.get("tokenizer")(config).data.name == "tiny_digits"
  config = configs.load("dlinear", "runlocal")
  config.data.name = "tiny_digits"
  with pytest.raises(ValueError, match="'tiny_digits' holds image data .* needs forecasting"):
    paperzoo.train_and_evaluate(config, "/nonexistent/never/written")
