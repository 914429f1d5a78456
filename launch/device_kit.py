r"""What a GPU session on the lent device machine needs beside the repository, in one folder.

The device tool sends the working tree and the ignored paths named in `carry`, 64 MiB a call,
and nothing beside the checkout: `../shared/data` stays behind. The CIFAR-10 zip alone is
62.3 MiB, so the data travel as one xz-compressed tar (all of `shared/data` is about 22 MiB
that way: 32x32 JPEGs are mostly identical headers, which a solid archive stores once), with
the wheels of the packages the device image lacks (`MISSING_ON_DEVICE`, from the device's
package list in the tool library; it has jax, flax, optax, orbax-checkpoint and the rest).

Here, once per session (needs pip's package index):

  python launch/device_kit.py pack          # -> .device_kit/ (ignored by git)

There, at the start of every command (carry=[".device_kit"]):

  kit=$(python3 launch/device_kit.py unpack) && eval "$kit" && python3 -m experiments.run ...

(not `eval "$(...)"`, whose status is eval's own: a failed unpack would not stop the run).
`unpack` extracts the data into /tmp/paperzoo_data once per machine and archive (a later call
with the same archive finds them there), installs the wheels into /tmp/paperzoo_site, and
prints the `export` lines that point PAPERZOO_DATA_DIR and PYTHONPATH at them. The data loaders check every file's sha256 when
they read it (`paperzoo.data.files`), so a damaged archive fails loudly there.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
KIT_DIR = REPO_ROOT / ".device_kit"
DATA_ARCHIVE = "data.tar.xz"
# Packages of setup.cfg's install_requires that the device image does not hold.
MISSING_ON_DEVICE = ("ml_collections", "tensorboardX")
# What one call may carry, less room for the working tree itself.
CARRY_LIMIT_BYTES = 56 * 2**20
DEVICE_PYTHON = "3.12"


def pack(data_dir: pathlib.Path, kit_dir: pathlib.Path, *, wheels: bool = True) -> int:
  """Writes the data archive (and the wheels) into `kit_dir`; returns the kit's size in bytes."""
  if not (data_dir / "SHA256SUMS").is_file():
    raise SystemExit(f"no data directory at {data_dir} (expected its SHA256SUMS there); "
                     "set PAPERZOO_DATA_DIR or pass --data_dir")
  kit_dir.mkdir(parents=True, exist_ok=True)
  with tarfile.open(kit_dir / DATA_ARCHIVE, "w:xz", preset=6) as archive:
    for path in sorted(data_dir.rglob("*")):
      if path.is_file():
        archive.add(path, arcname=path.relative_to(data_dir).as_posix(), recursive=False)
  if wheels:
    wheel_dir = kit_dir / "whl"
    wheel_dir.mkdir(exist_ok=True)
    for old in wheel_dir.glob("*.whl"):
      old.unlink()
    # The versions tested here, as pure-Python wheels for the device's Python.
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING_ON_DEVICE]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
                    "--implementation", "cp", "-d", str(wheel_dir), *pins], check=True)
  size = sum(p.stat().st_size for p in kit_dir.rglob("*") if p.is_file())
  if size > CARRY_LIMIT_BYTES:
    raise SystemExit(f"{kit_dir} holds {size / 2**20:.1f} MiB, over the "
                     f"{CARRY_LIMIT_BYTES / 2**20:.0f} MiB that can travel beside the repository")
  return size


def unpack(kit_dir: pathlib.Path, data_dir: pathlib.Path, site_dir: pathlib.Path) -> str:
  """Extracts the data (once per archive) and installs the wheels; returns the shell lines to
  `eval`."""
  archive_path = kit_dir / DATA_ARCHIVE
  digest = hashlib.sha256(archive_path.read_bytes()).hexdigest()
  marker = data_dir / ".unpacked"  # holds the digest of the archive extracted there
  if not marker.is_file() or marker.read_text() != digest:
    data_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path, "r:xz") as archive:
      archive.extractall(data_dir, filter="data")
    marker.write_text(digest)
  wheel_files = sorted(str(p) for p in (kit_dir / "whl").glob("*.whl"))
  if wheel_files:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                    "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                    str(site_dir), *wheel_files], check=True, stdout=sys.stderr)
  python_path = os.pathsep.join(p for p in (str(site_dir), str(REPO_ROOT),
                                            os.environ.get("PYTHONPATH", "")) if p)
  return (f"export PAPERZOO_DATA_DIR={shlex.quote(str(data_dir))}\n"
          f"export PYTHONPATH={shlex.quote(python_path)}\n")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  pack_parser = sub.add_parser("pack", help="here: write .device_kit/")
  pack_parser.add_argument("--data_dir", type=pathlib.Path, default=pathlib.Path(
      os.environ.get("PAPERZOO_DATA_DIR", REPO_ROOT.parent / "shared" / "data")))
  pack_parser.add_argument("--no_wheels", action="store_true",
                           help="data only (no package index needed)")
  unpack_parser = sub.add_parser("unpack", help="there: extract, install, print exports")
  unpack_parser.add_argument("--data_dir", type=pathlib.Path,
                             default=pathlib.Path("/tmp/paperzoo_data"))
  unpack_parser.add_argument("--site_dir", type=pathlib.Path,
                             default=pathlib.Path("/tmp/paperzoo_site"))
  for p in (pack_parser, unpack_parser):
    p.add_argument("--kit_dir", type=pathlib.Path, default=KIT_DIR)
  args = parser.parse_args(argv)
  if args.command == "pack":
    size = pack(args.data_dir.resolve(), args.kit_dir, wheels=not args.no_wheels)
    print(f"{args.kit_dir}: {size / 2**20:.1f} MiB; carry it as "
          f"{os.path.relpath(args.kit_dir, REPO_ROOT)!r}")
  else:
    sys.stdout.write(unpack(args.kit_dir, args.data_dir, args.site_dir))


if __name__ == "__main__":
  main()
