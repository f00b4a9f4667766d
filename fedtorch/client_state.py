"""Per-client vectors that persist across rounds (SCAFFOLD's c_i, FedDyn's gradient state).

With N clients and P parameters a full table is N x P floats: 1000 clients of a 1.7M
parameter CNN would be 6.8 GB. Neither storage keeps that on the training device:

``memory``
    a CPU tensor per client, created the first time the client is written. Clients never
    sampled cost nothing, so memory grows with the clients seen, not with N.
``disk``
    one N x P float32 file memory-mapped from the run folder (``client_state/NAME.bin``),
    created sparse: rows never written take no disk space, and the operating system
    keeps only recently used rows in RAM.

A row never written reads as zeros, the initial value of both algorithms' state.
"""

from __future__ import annotations

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
        self._table: torch.Tensor | None = None
        self._written: set[int] = set()  # disk: rows holding state, so nothing scans the file
        if storage == "disk":
            if path is None:
                raise ConfigError(key, "disk storage needs a run folder")
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(num_clients * size * 4)
            flat = torch.from_file(str(path), shared=True, size=num_clients * size)
            self._table = flat.view(num_clients, size)
            self.path = path

    @classmethod
    def for_run(cls, context, storage: str, name: str) -> ClientStateStore:
        """A store of one [P] row per client of the run described by ``context`` (a
        :class:`~fedtorch.strategies.base.RunContext`), on disk under
        ``run_dir/client_state/NAME.bin`` when ``storage`` is ``disk``."""
        run_dir = context.run_dir
        path = run_dir / "client_state" / f"{name}.bin" if run_dir else None
        return cls(context.num_clients, context.size, storage, path, "strategy.client_state")

    def get(self, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s row [P] on the CPU (zeros if never written); a copy."""
        if self._table is not None:
            return self._table[client_id].clone()
        row = self._rows.get(client_id)
        return row.clone() if row is not None else torch.zeros(self.size)

    def set(self, client_id: int, value: torch.Tensor) -> None:
        """Store ``value`` [P] as client ``client_id``'s row."""
        value = value.detach().to("cpu", torch.float32)
        if self._table is not None:
            self._table[client_id].copy_(value)
            self._written.add(client_id)
        else:
            self._rows[client_id] = value.clone()

    def state_dict(self) -> dict[int, torch.Tensor]:
        """The rows written so far (for checkpoints)."""
        if self._table is not None:
            return {c: self._table[c].clone() for c in sorted(self._written)}
        return {c: r.clone() for c, r in self._rows.items()}

    def load_state_dict(self, rows: dict[int, torch.Tensor]) -> None:
        """Make the store hold exactly ``rows`` (rows written since are reset to zero)."""
        for c in self._written:  # only these rows can be non-zero: the file stays sparse
            self._table[c].zero_()
        self._written.clear()
        self._rows.clear()
        for c, r in rows.items():
            self.set(int(c), r)
