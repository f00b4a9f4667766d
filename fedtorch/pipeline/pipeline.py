"""The update pipeline: each client's update, one at a time and in cohort order, through the
per-update steps into the round's aggregator.

    engine ─► pipeline.add(client, delta)
                 check_finite ─► attack? ─► compress and decode (+ residual)?
                 ─► clip/noise or pre-weight? ─► mask?
                 ─► aggregator.add (running sums, or rows for rules that need them)
    orchestrator ─► pipeline.finish() ─► new global vector

A step is a callable ``(client, update) -> update``: it may change the update in place or
return something else to pass on (secure aggregation's masked message), or raise
:class:`RejectedUpdate` to drop the client from the round (logged as a failure). Engines
lend the delta only for the duration of :meth:`UpdatePipeline.add`, so no step and no
aggregator may keep it; the server therefore never holds the round's [K, P] matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from fedtorch.results import ClientFailure, ClientResult
from fedtorch.strategies.streaming import Aggregator

Step = Callable[[ClientResult, Any], Any]


class RejectedUpdate(Exception):
    """Raised by a step: the client's update is unusable; the message says why."""


class UpdateSink(Protocol):
    """What an engine hands its results to (an :class:`UpdatePipeline`)."""

    def add(self, client: ClientResult, delta: torch.Tensor) -> None: ...

    def fail(self, failure: ClientFailure) -> None: ...


def all_finite(update: torch.Tensor, block: int = 1 << 20) -> bool:
    """Whether every value is finite, without a full-size temporary.

    A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum settles it with one
    reduction; only a non-finite sum (or an overflow of finite values) is checked block by
    block (``isfinite`` of the whole vector would allocate several times its size).
    """
    if bool(torch.isfinite(update.sum())):
        return True
    flat = update.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + block]).all()) for i in range(0, flat.numel(), block)
    )


def check_finite(client: ClientResult, update: torch.Tensor) -> torch.Tensor:
    """Reject an update with NaN or Inf values (one sync with the device per client)."""
    if not all_finite(update):
        raise RejectedUpdate("update has NaN or Inf values")
    return update


class UpdatePipeline:
    """One round's pipeline: ``steps`` in order, then ``aggregator``.

    Attributes:
        clients: the clients whose updates reached the aggregator, in cohort order.
        failures: clients dropped from the round (by the engine or by a step), in the
            order they failed.
    """

    def __init__(self, steps: Sequence[Step], aggregator: Aggregator) -> None:
        self.steps, self.aggregator = list(steps), aggregator
        self.clients: list[ClientResult] = []
        self.failures: list[ClientFailure] = []

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        """Pass one client's delta [P] (lent, not kept) through the steps into the
        aggregator."""
        update: Any = delta
        try:
            for step in self.steps:
                update = step(client, update)
        except RejectedUpdate as rejected:
            self.failures.append(ClientFailure(client.client_id, str(rejected)))
            return
        self.aggregator.add(client, update)
        self.clients.append(client)

    def add_elsewhere(self, client: ClientResult) -> None:
        """Record a client whose update was checked and summed by the process that trained
        it (``aggregation.collective=allreduce``); its sum reaches the aggregator later."""
        self.clients.append(client)

    def fail(self, failure: ClientFailure) -> None:
        """Record a client whose training failed before it produced an update."""
        self.failures.append(failure)

    def finish(self) -> torch.Tensor:
        """The new global vector (the aggregator's server step)."""
        return self.aggregator.finish()
