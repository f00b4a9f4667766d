"""Per-client vectors that persist across rounds (SCAFFOLD's c_i, FedDyn's gradient state).

With N clients and P parameters a full table is N x P floats: 1000 clients of a 1.7M
parameter CNN would be 6.8 GB. Neither storage keeps that on the training device:

``memory``
    a CPU tensor per client, created the first time the client is written. Clients never
    sampled cost nothing, so memory grows with the clients seen, not with N.
``disk``
    one N x P float32 file in the run folder (``client_state/NAME.bin``), created sparse:
    rows never written take no disk space. Rows are read and written with ``pread`` /
    ``pwrite``, so they sit in the operating system's page cache, never in the process:
    its memory does not grow with the rows touched.

A row never written reads as zeros, the initial value of both algorithms' state.

Writes during a round are staged (:meth:`ClientStateStore.stage`) and only take effect at
:meth:`ClientStateStore.commit`, when the server accepts the round: a round interrupted
part-way leaves the store as it was, so a checkpoint and its resumption stay exact. On
disk the staged rows go to a second sparse file (``NAME.staged.bin``), so staging a large
cohort's rows does not hold them in memory either.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedtorch.errors import ConfigError

STORAGES = ("memory", "disk")


class ClientStateStore:
    """Rows of ``size`` floats, one per client, read and written by client id.

    Args:
        num_clients: N.
        size: P, the length of a row.
        storage: ``memory`` or ``disk`` (see the module docstring).
        path: the backing file for ``disk``.
        key: the config key named in errors.
    """

    def __init__(
        self,
        num_clients: int,
        size: int,
        storage: str = "memory",
        path: Path | None = None,
        key: str = "strategy.client_state",
    ) -> None:
        if storage not in STORAGES:
            raise ConfigError(key, f"must be one of {STORAGES}, got {storage!r}")
        self.num_clients, self.size, self.storage = num_clients, size, storage
        self._rows: dict[int, torch.Tensor] = {}
        self._staged: dict[int, torch.Tensor | None] = {}  # disk: None, the row is in the file
        self._written: set[int] = set()  # disk: rows holding state, so nothing scans the file
        self._files: dict[str, int] = {}
        if storage == "disk":
            if path is None:
                raise ConfigError(key, "disk storage needs a run folder")
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            for name, file in (("rows", path), ("staged", path.with_suffix(".staged.bin"))):
                fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                os.fchmod(fd, 0o600)  # per-client state: owner-only, also if it existed
                os.ftruncate(fd, num_clients * size * 4)
                self._files[name] = fd

    @classmethod
    def in_run_folder(
        cls, run_dir: Path | None, name: str, num_clients: int, size: int, storage: str, key: str
    ) -> ClientStateStore:
        """A store of ``num_clients`` rows of ``size``, on disk under
        ``run_dir/client_state/NAME.bin`` when ``storage`` is ``disk``; ``key`` is the
        config key named in errors."""
        path = Path(run_dir) / "client_state" / f"{name}.bin" if run_dir else None
        return cls(num_clients, size, storage, path, key)

    @classmethod
    def for_run(cls, context, storage: str, name: str) -> ClientStateStore:
        """A store of one [P] row per client of the run described by ``context`` (a
        :class:`~fedtorch.strategies.base.RunContext`), on disk under
        ``run_dir/client_state/NAME.bin`` when ``storage`` is ``disk``."""
        return cls.in_run_folder(
            context.run_dir,
            name,
            context.num_clients,
            context.size,
            storage,
            "strategy.client_state",
        )

    def get(self, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s committed row [P] on the CPU (zeros if never written); a
        copy."""
        if self._files:
            if client_id not in self._written:
                return torch.zeros(self.size)
            return self._read("rows", client_id)
        row = self._rows.get(client_id)
        return row.clone() if row is not None else torch.zeros(self.size)

    def set(self, client_id: int, value: torch.Tensor) -> None:
        """Store ``value`` [P] as client ``client_id``'s row, now."""
        value = value.detach().to("cpu", torch.float32)
        if self._files:
            self._write("rows", client_id, value)
            self._written.add(client_id)
        else:
            self._rows[client_id] = value.clone()

    def stage(self, client_id: int, value: torch.Tensor) -> None:
        """Make ``value`` client ``client_id``'s row at the next :meth:`commit`."""
        value = value.detach().to("cpu", torch.float32)
        if self._files:
            self._write("staged", client_id, value)
            self._staged[client_id] = None
        else:
            self._staged[client_id] = value.clone()

    def commit(self) -> None:
        """Apply the staged rows."""
        for client_id, value in self._staged.items():
            self.set(client_id, self._read("staged", client_id) if value is None else value)
        self._staged.clear()

    def discard(self) -> None:
        """Forget the staged rows (a round that did not finish)."""
        self._staged.clear()

    def state_dict(self) -> dict[int, torch.Tensor]:
        """The committed rows written so far (for checkpoints)."""
        if self._files:
            return {c: self._read("rows", c) for c in sorted(self._written)}
        return {c: r.clone() for c, r in self._rows.items()}

    def load_state_dict(self, rows: dict[int, torch.Tensor]) -> None:
        """Make the store hold exactly ``rows`` (rows written since are reset to zero)."""
        zeros = torch.zeros(self.size)
        for c in self._written:  # only these rows can be non-zero: the file stays sparse
            self._write("rows", c, zeros)
        self._written.clear()
        self._rows.clear()
        self._staged.clear()
        for c, r in rows.items():
            self.set(int(c), r)

    def _read(self, file: str, client_id: int) -> torch.Tensor:
        row = torch.empty(self.size)
        read = os.preadv(self._files[file], [memoryview(row.numpy())], client_id * self.size * 4)
        if read != self.size * 4:
            raise OSError(f"short read of client {client_id}'s row from {self.path}")
        return row

    def _write(self, file: str, client_id: int, value: torch.Tensor) -> None:
        data = memoryview(value.contiguous().numpy())
        os.pwrite(self._files[file], data, client_id * self.size * 4)
