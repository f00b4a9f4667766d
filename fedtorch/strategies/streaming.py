"""How a strategy takes a round's updates: one client at a time, in cohort order.

An :class:`Aggregator` is made fresh for every round (:meth:`Strategy.start_round`). The
update pipeline calls :meth:`Aggregator.add` once per accepted client, in cohort order,
with a delta it lends only for the duration of the call, then :meth:`Aggregator.finish`
once, inside the part of the round that changes server state, for the new global vector.

Two kinds exist:

* running sums (:class:`RunningMean`, used by every mean-based rule): memory of a few [P]
  vectors whatever the cohort size; sums run in the order the updates arrive, which is
  cohort order, so the result does not depend on the engine or how it chunked the cohort;
* :class:`RowCollector`: every row kept in a :class:`~fedtorch.strategies.rows.RowStore`
  (in memory, or spilled to the run folder past ``aggregation.memory_budget_mb``), for
  rules that compare updates with each other, and for a user's strategy that only
  implements ``aggregate`` over the [K, P] matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from fedtorch.results import ClientResult
from fedtorch.strategies.rows import RowStore


class Aggregator(Protocol):
    """One round's aggregation, fed one update at a time."""

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        """Take one client's delta [P]; ``delta`` is only lent: copy what must be kept."""

    def finish(self) -> torch.Tensor:
        """The new global vector [P]; the only place where the strategy's state changes."""


class RunningMean:
    """sum_k w_k u_k / sum_k w_k, accumulated one update at a time in arrival order."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.weight = 0.0

    def add(self, update: torch.Tensor, weight: float) -> None:
        if self.total is None:
            self.total = torch.zeros_like(update)
        self.total.add_(update, alpha=weight)
        self.weight += weight

    def mean(self) -> torch.Tensor:
        """The weighted mean [P] (computed in place: the running sum is consumed)."""
        if self.total is None or not self.weight > 0:
            raise ValueError("aggregation weights must sum to a positive number")
        return self.total.div_(self.weight)


class RowCollector:
    """Keeps every row, then hands the clients and the rows to ``finish_fn``.

    Args:
        rows: where the rows go (see :class:`~fedtorch.strategies.rows.RowStore`).
        finish_fn: ``(clients, rows) -> new global vector``.
    """

    def __init__(
        self, rows: RowStore, finish_fn: Callable[[list[ClientResult], RowStore], torch.Tensor]
    ) -> None:
        self.rows, self.finish_fn = rows, finish_fn
        self.clients: list[ClientResult] = []

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        self.clients.append(client)
        self.rows.append(delta)

    def finish(self) -> torch.Tensor:
        try:
            return self.finish_fn(self.clients, self.rows)
        finally:
            self.rows.close()
