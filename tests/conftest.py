"""Shared test set-up: where the data lives, and quiet logs."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# CI sets PAPERZOO_DATA_DIR=../shared/data; a developer checkout finds the same place by default.
os.environ.setdefault("PAPERZOO_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _quiet_absl_logging():
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  yield
