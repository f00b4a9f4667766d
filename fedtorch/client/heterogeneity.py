"""System heterogeneity: clients that do different amounts of work, and clients that drop out.

Real federations have slow devices that finish fewer local steps and devices that vanish
mid-round. :class:`SystemHeterogeneity` simulates both on the round's tasks, with every
draw seeded by ``(seed, round, client)`` so runs repeat exactly on any engine.

``work``
    ``fixed``: every client runs ``client.epochs`` / ``client.steps``.
    ``uniform_steps``: each client draws its local steps uniformly from ``[low, high]``.
    ``uniform_epochs``: each client draws its local epochs uniformly from ``[low, high]``
    (steps = epochs * ceil(n_k / B)); FedNova's experiments use [2, 5].
``dropout``
    probability that a sampled client drops out of the round after it was sampled: it
    receives the model (counted in ``bytes_down``) but never reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedtorch import seeding
from fedtorch.errors import ConfigError
from fedtorch.results import ClientTask

WORK = ("fixed", "uniform_steps", "uniform_epochs")


class SystemHeterogeneity:
    """Per-client local work and per-round drop-outs.

    Args:
        work: ``fixed`` | ``uniform_steps`` | ``uniform_epochs``.
        low, high: inclusive range of the drawn steps or epochs (integers >= 1).
        dropout: per-client drop-out probability in [0, 1).
        seed: the run seed.
    """

    def __init__(
        self,
        work: str = "fixed",
        low: int = 1,
        high: int = 1,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        if work not in WORK:
            raise ConfigError("system.work", f"must be one of {WORK}, got {work!r}")
        if work != "fixed":
            for key, value in (("low", low), ("high", high)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"system.{key}", f"must be an integer >= 1, got {value!r}")
            if low > high:
                raise ConfigError("system.low", f"must be <= system.high={high}, got {low}")
        number = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        if not number or not 0 <= dropout < 1:
            raise ConfigError("system.dropout", f"must be in [0, 1), got {dropout!r}")
        self.work, self.low, self.high, self.dropout, self.seed = work, low, high, dropout, seed

    def apply(
        self,
        tasks: Sequence[ClientTask],
        round_idx: int,
        shard_sizes: Sequence[int],
        batch_size: int,
    ) -> tuple[list[ClientTask], list[int]]:
        """Set each task's local steps and drop clients; returns (kept tasks, dropped ids)."""
        kept, dropped = [], []
        for task in tasks:
            gen = seeding.generator(self.seed, seeding.SYSTEM, round_idx, task.client_id)
            if self.dropout and torch.rand(1, generator=gen).item() < self.dropout:
                dropped.append(task.client_id)
                continue
            if self.work != "fixed":
                drawn = int(torch.randint(self.low, self.high + 1, (1,), generator=gen))
                if self.work == "uniform_epochs":
                    drawn *= math.ceil(shard_sizes[task.client_id] / batch_size)
                task.steps = drawn
            kept.append(task)
        return kept, dropped
