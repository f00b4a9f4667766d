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

The steps the docs call the client's (the attack, compression, DP clipping and local noise)
form the pipeline's :class:`ClientSide`. In one process :meth:`UpdatePipeline.add` runs
them and then the server's steps; under ``engine=distributed`` the rank that trained the
client runs them and rank 0 hands what arrived, with the client's receipt (bytes sent, the
adaptive-clipping bit), to :meth:`UpdatePipeline.add_sent`, which runs the server's steps
only.
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


class ClientSide(Protocol):
    """The client's steps of one round, and what the server records of what they sent."""

    def run(self, client: ClientResult, delta: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        """Where the client trained: its update as sent, and its receipt (plain values the
        server records); raises :class:`RejectedUpdate` for an unusable update."""
        ...

    def accept(self, client: ClientResult, receipt: dict[str, Any]) -> None:
        """On the server: record a client's receipt; raises ``ValueError`` (saying what is
        wrong) for a receipt that lacks what this round's steps report."""
        ...


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

    def __init__(
        self, steps: Sequence[Step], aggregator: Aggregator, client_side: ClientSide | None = None
    ) -> None:
        self.steps, self.aggregator, self.client_side = list(steps), aggregator, client_side
        self.clients: list[ClientResult] = []
        self.failures: list[ClientFailure] = []

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        """Pass one client's delta [P] (lent, not kept) through the steps into the
        aggregator."""
        try:
            update: Any = delta
            if self.client_side is not None:
                update, receipt = self.client_side.run(client, update)
                self.client_side.accept(client, receipt)
            self._server_side(client, update)
        except RejectedUpdate as rejected:
            self.failures.append(ClientFailure(client.client_id, str(rejected)))

    def add_sent(self, client: ClientResult, sent: torch.Tensor, receipt: dict[str, Any]) -> None:
        """Take one client's update [P] as the rank that trained it sent it (after its
        client-side steps; lent, not kept): check it is finite, record its ``receipt``,
        then run the server's steps into the aggregator. Raises ``ValueError`` for a
        receipt this round's client side does not accept."""
        try:
            check_finite(client, sent)
            if self.client_side is not None:
                self.client_side.accept(client, receipt)
            self._server_side(client, sent)
        except RejectedUpdate as rejected:
            self.failures.append(ClientFailure(client.client_id, str(rejected)))

    def _server_side(self, client: ClientResult, update: Any) -> None:
        """The server's steps, then the aggregator; the client counts as reported."""
        for step in self.steps:
            update = step(client, update)
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
