"""launch/device_kit.py: the data travel to the device machine and come back byte for byte."""

import importlib.util
import pathlib

import pytest

from paperzoo.data import files

_SPEC = importlib.util.spec_from_file_location(
    "device_kit", pathlib.Path(__file__).resolve().parent.parent / "launch" / "device_kit.py")
device_kit = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(device_kit)


def _fake_data_dir(root: pathlib.Path) -> pathlib.Path:
  data = root / "data"
  (data / "ett").mkdir(parents=True)
  (data / "ett" / "ETTh1.csv").write_text("date,OT\n2016-07-01 00:00:00,30.5\n")
  (data / "uea" / "BasicMotions").mkdir(parents=True)
  (data / "uea" / "BasicMotions" / "BasicMotions_TRAIN.ts").write_bytes(bytes(range(256)) * 9)
  (data / "SHA256SUMS").write_text("")
  return data


def test_pack_then_unpack_restores_every_file(tmp_path, monkeypatch):
  data = _fake_data_dir(tmp_path)
  kit = tmp_path / "kit"
  device_kit.pack(data, kit, wheels=False)
  assert (kit / device_kit.DATA_ARCHIVE).is_file()

  unpacked, site = tmp_path / "device" / "data", tmp_path / "device" / "site"
  monkeypatch.delenv("PYTHONPATH", raising=False)
  exports = device_kit.unpack(kit, unpacked, site)
  assert f"export PAPERZOO_DATA_DIR={unpacked}" in exports
  assert f"export PYTHONPATH={site}:{device_kit.REPO_ROOT}" in exports
  originals = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
  assert originals == sorted(p.relative_to(unpacked) for p in unpacked.rglob("*")
                             if p.is_file() and p.name != ".unpacked")
  for relpath in originals:
    assert files.file_sha256(unpacked / relpath) == files.file_sha256(data / relpath)

  # A later call on the same machine finds the data there and does not extract again...
  (unpacked / "ett" / "ETTh1.csv").write_text("edited")
  device_kit.unpack(kit, unpacked, site)
  assert (unpacked / "ett" / "ETTh1.csv").read_text() == "edited"
  # ...unless the kit was packed anew since.
  (data / "ett" / "ETTh2.csv").write_text("date,OT\n")
  device_kit.pack(data, kit, wheels=False)
  device_kit.unpack(kit, unpacked, site)
  assert (unpacked / "ett" / "ETTh1.csv").read_text() == (data / "ett" / "ETTh1.csv").read_text()
  assert (unpacked / "ett" / "ETTh2.csv").is_file()


def test_pack_without_data_dir_says_where_it_looked(tmp_path):
  with pytest.raises(SystemExit, match=f"no data directory at {tmp_path}"):
    device_kit.pack(tmp_path, tmp_path / "kit", wheels=False)


def test_pack_refuses_a_kit_too_large_to_travel(tmp_path, monkeypatch):
  monkeypatch.setattr(device_kit, "CARRY_LIMIT_BYTES", 10)
  with pytest.raises(SystemExit, match="over the"):
    device_kit.pack(_fake_data_dir(tmp_path), tmp_path / "kit", wheels=False)
