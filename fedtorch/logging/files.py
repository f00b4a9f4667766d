"""Files of the run folder: written atomically (a crash never leaves half a file behind,
and the folder is fsynced after the rename so the new name survives a power cut), private
where they hold per-client updates or state, and one writer per folder (:class:`RunLock`)."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from fedtorch.errors import ConfigError


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(payload))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any], private: bool = False) -> None:
    """``write(file)`` into a temporary file in the same folder, flush, fsync, rename over
    ``path``, fsync the folder. Writing straight to the file keeps no serialized copy in
    memory. ``private``: the file is readable by its owner only (0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if not private:  # mkstemp makes 0600; give the usual file permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_file(path: Path) -> int:
    """Open (create, truncate) ``path`` for reading and writing, owner-only (0600): for
    files that hold clients' updates or per-client state. Returns the descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    return fd


LOCK_NAME = ".fedtorch.lock"


class RunLock:
    """One writer per run folder: an exclusive ``flock`` on ``RUN/.fedtorch.lock``, held
    until :meth:`release` or the process ends. Re-entrant within a process (a run built
    twice in one process, as a resume test does), refused across processes."""

    _held: dict[Path, list] = {}  # folder -> [file object, count]

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        held = RunLock._held.get(self.folder)
        if held is not None:
            held[1] += 1
            return
        handle = open(self.folder / LOCK_NAME, "a+")  # noqa: SIM115 (held past this call)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                "hydra.run.dir",
                f"{folder} is in use by another run ({owner}); wait for it to finish or give "
                "this run another folder",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        RunLock._held[self.folder] = [handle, 1]

    def release(self) -> None:
        held = RunLock._held.get(self.folder)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del RunLock._held[self.folder]
            held[0].close()  # closing the file drops the flock


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
