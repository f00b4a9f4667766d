"""Distributed engine: a round's clients trained by several processes (torch.distributed).

The cohort is cut into contiguous chunks of ``chunk_size`` clients, a size that does not
depend on the number of processes, and chunk i goes to rank ``i mod world_size``. Every
rank trains its chunks with the inner engine (sequential, or vectorized with the chunk as
its cohort). Rank 0, the server, broadcasts the global weights at the start of the round
and sends each worker its clients' tasks (with any per-client state the strategy keeps on
the server, such as SCAFFOLD's c - c_i, evaluated there); workers send every client's
update back as soon as it is trained. Rank 0 feeds the updates to the round's pipeline in
cohort order (``aggregation.collective=gather``), so every strategy, robust ones included,
aggregates exactly what the one-process run aggregates: the final weights are
bit-identical whatever the number of processes (with the same ``torch_threads`` per
process; the number of intra-op threads can change float results).

Failures: a worker whose messages stop for ``distributed.timeout_s`` seconds (hung or
dead) stops the run on rank 0 with an error naming it; a worker that hears nothing from
rank 0 for as long stops likewise. A client that raises on a worker is reported to rank 0
and dropped from the round as in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fedtorch.client import ClientTrainer
from fedtorch.distributed import DistributedError, isend_object, lost_peer, recv_object
from fedtorch.errors import ConfigError
from fedtorch.pipeline.pipeline import UpdatePipeline, all_finite
from fedtorch.results import ClientFailure, ClientResult, ClientTask, resolve

COLLECTIVES = ("gather", "allreduce")


class DistributedEngine:
    """See the module docstring.

    Args:
        inner: the engine each rank trains its chunks with.
        chunk_size: clients per chunk (contiguous in cohort order).
        timeout_s: seconds a rank waits for another before failing the run.
        collective: how updates reach the aggregator: ``gather`` (each one to rank 0, in
            cohort order) or ``allreduce`` (each rank sums its clients' weighted updates in
            float64 and the sums are added on rank 0; plain weighted means only).
    """

    def __init__(
        self,
        inner: Any,
        chunk_size: int = 1,
        timeout_s: float = 1800.0,
        collective: str = "gather",
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError("engine.chunk_size", f"must be an integer >= 1, got {chunk_size!r}")
        if collective not in COLLECTIVES:
            raise ConfigError(
                "aggregation.collective", f"must be one of {COLLECTIVES}, got {collective!r}"
            )
        if not dist.is_initialized():
            raise ConfigError(
                "engine",
                "engine=distributed runs under torchrun: fedtorch-run --nproc_per_node=N -- "
                "OVERRIDES, or torchrun --nproc_per_node=N -m fedtorch.train OVERRIDES",
            )
        self.inner, self.chunk_size, self.timeout_s = inner, chunk_size, float(timeout_s)
        self.collective = collective
        # data.silos: the rank holding each client's data (None: any rank, by chunk).
        self._owner: Callable[[int], int] | None = None
        # Everything goes over the default group (gloo, plus NCCL for CUDA tensors), made at
        # start-up with the run's timeout (fedtorch.distributed.start).
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def check(self, trainer: ClientTrainer) -> None:
        """Refuse what lives on the rank that trained a client, not on the server."""
        if hasattr(self.inner, "check"):
            self.inner.check(trainer)
        if trainer.layout.keys("local"):
            raise ConfigError(
                "engine",
                "engine=distributed cannot keep clients' local keys (key_rules with rule "
                "local, strategy=fedbn): they would live on whichever rank trained the client; "
                "use engine=sequential",
            )
        if getattr(trainer, "accountants", None) is not None:
            raise ConfigError(
                "engine",
                "engine=distributed cannot run client=dpsgd: each client's privacy accountant "
                "would live on whichever rank trained it; use engine=sequential",
            )

    def place_clients(self, owner: Callable[[int], int]) -> None:
        """``data.silos``: train each client on the rank ``owner(client_id)`` that holds
        its data, instead of spreading chunks over the ranks."""
        self._owner = owner

    def _assign(self, tasks: Sequence[ClientTask]) -> list[tuple[int, list[ClientTask]]]:
        """(rank, chunk) pairs in cohort order: contiguous chunks of ``chunk_size``, chunk i
        on rank i mod world size; with silos, runs of clients of one rank, cut at
        ``chunk_size``."""
        c = self.chunk_size
        if self._owner is None:
            chunks = [list(tasks[i : i + c]) for i in range(0, len(tasks), c)]
            return [(i % self.world, chunk) for i, chunk in enumerate(chunks)]
        assigned: list[tuple[int, list[ClientTask]]] = []
        for task in tasks:
            owner = self._owner(task.client_id)
            if assigned and assigned[-1][0] == owner and len(assigned[-1][1]) < c:
                assigned[-1][1].append(task)
            else:
                assigned.append((owner, [task]))
        return assigned

    def _broadcast_weights(
        self, global_state: Mapping[str, torch.Tensor], global_vector: torch.Tensor
    ) -> None:
        for tensor in (*global_state.values(), global_vector):
            dist.broadcast(tensor, 0)

    # Rank 0 ------------------------------------------------------------------------------

    def run(
        self,
        trainer: ClientTrainer,
        tasks: Sequence[ClientTask],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
        sink: UpdatePipeline,
    ) -> None:
        """Train ``tasks`` across the ranks; updates reach ``sink`` in cohort order."""
        assigned = self._assign(tasks)
        self._announce("round", round_idx)
        self._broadcast_weights(global_state, global_vector)
        pending = []
        for worker in range(1, self.world):
            mine = [[_portable(t) for t in chunk] for owner, chunk in assigned if owner == worker]
            pending += isend_object(mine, worker)
        buffer = torch.empty_like(global_vector)
        for owner, chunk in assigned:
            if owner == 0:
                self.inner.run(trainer, chunk, shards, global_state, global_vector, round_idx, sink)
            else:
                self._receive(owner, chunk, round_idx, buffer, sink)
        for work, _ in pending:
            work.wait()
        if self.collective == "allreduce":
            sink.aggregator.reduce()

    def _receive(
        self,
        owner: int,
        chunk: list[ClientTask],
        round_idx: int,
        buffer: torch.Tensor,
        sink: UpdatePipeline,
    ) -> None:
        """Feed one worker's chunk to ``sink``, message by message, until its end mark."""
        try:
            while True:
                kind, payload = recv_object(owner)
                if kind == "end":
                    return
                if kind == "failed":
                    sink.fail(payload)
                    continue
                if kind == "summed":
                    sink.add_elsewhere(payload)
                    continue
                dist.recv(buffer, owner)
                sink.add(payload, buffer)
        except RuntimeError as exc:
            clients = ", ".join(str(t.client_id) for t in chunk)
            raise lost_peer(
                f"distributed: round {round_idx}: rank {owner} did not deliver the updates of "
                f"clients {clients} within distributed.timeout_s={self.timeout_s:g} (hung or "
                f"dead): {_first_line(exc)}"
            ) from None

    def evaluate_silos(
        self,
        global_state: Mapping[str, torch.Tensor],
        here: Callable[[], dict[int, torch.Tensor]],
    ) -> dict[int, torch.Tensor]:
        """Rank 0, ``data.silos``: every rank evaluates the global weights on its silo's
        test split; returns each silo's evaluation totals."""
        self._announce("evaluate", 0)
        for tensor in global_state.values():
            dist.broadcast(tensor, 0)
        totals = dict(here())
        for worker in range(1, self.world):
            try:
                totals.update(recv_object(worker))
            except RuntimeError as exc:
                raise lost_peer(
                    f"distributed: rank {worker} did not send its silo's evaluation within "
                    f"distributed.timeout_s={self.timeout_s:g} (hung or dead): {_first_line(exc)}"
                ) from None
        return totals

    def _announce(self, kind: str, round_idx: int) -> None:
        """Rank 0: check every worker is there (gloo's monitored barrier names the ones
        that are not; before round 1 this also bounds start-up), then tell them what comes
        next."""
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        except RuntimeError as exc:
            raise lost_peer(
                f"distributed: round {round_idx}: not every rank is there after "
                f"distributed.timeout_s={self.timeout_s:g}: {_first_line(exc)}"
            ) from None
        dist.broadcast_object_list([(kind, round_idx)], src=0)

    def close(self) -> None:
        """Tell the workers the run is over (rank 0, after the last round)."""
        if self.rank == 0 and self.world > 1:
            # A worker already gone is left to torchrun, which ends the others.
            with contextlib.suppress(RuntimeError, DistributedError, KeyboardInterrupt):
                self._announce("stop", 0)

    # Workers -----------------------------------------------------------------------------

    def serve(
        self,
        trainer: ClientTrainer,
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        strategy: Any,
        evaluate_here: Callable[[], dict[int, torch.Tensor]] | None = None,
    ) -> None:
        """A worker's loop: each round, receive the weights and this rank's chunks, train
        them, send the updates; with silos, evaluate the weights rank 0 sends on this
        rank's silo when asked (``evaluate_here``); return when rank 0 says stop."""
        while True:
            try:
                dist.monitored_barrier(
                    timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True
                )
                message: list[Any] = [None]
                dist.broadcast_object_list(message, src=0)
                kind, round_idx = message[0]
                if kind == "stop":
                    return
                if kind == "evaluate":
                    for tensor in global_state.values():
                        dist.broadcast(tensor, 0)
                    if evaluate_here is None:
                        raise DistributedError("rank 0 asked for an evaluation on no silo")
                    _wait(isend_object(evaluate_here(), 0))
                    continue
                self._broadcast_weights(global_state, global_vector)
                chunks = recv_object(0)
            except RuntimeError as exc:
                raise lost_peer(
                    f"distributed: rank {self.rank} heard nothing from rank 0 within "
                    f"distributed.timeout_s={self.timeout_s:g} (hung or dead): {_first_line(exc)}"
                ) from None
            summed = SummedRound(strategy, global_vector, round_idx)
            forward = _Forward(summed if self.collective == "allreduce" else None)
            for chunk in chunks:
                self.inner.run(
                    trainer, chunk, shards, global_state, global_vector, round_idx, forward
                )
                forward.end_chunk()
            forward.wait()
            if self.collective == "allreduce":
                summed.reduce()


class SummedRound:
    """``aggregation.collective=allreduce``: one rank's sum of w_k * delta_k and of w_k over
    the clients it trained, in float64 (w_k: the strategy's client weight); :meth:`reduce`
    adds every rank's sums on rank 0, whose :meth:`finish` applies the strategy's server
    step to the weighted mean. The sums group the clients by rank, so the result equals
    the one-process run's to float rounding, not bit for bit."""

    def __init__(self, strategy: Any, global_vector: torch.Tensor, round_idx: int) -> None:
        self.strategy, self.global_vector, self.round_idx = strategy, global_vector, round_idx
        self.total = torch.zeros(
            global_vector.numel(), dtype=torch.float64, device=global_vector.device
        )
        self.weight = torch.zeros(1, dtype=torch.float64, device=global_vector.device)

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        weight = float(self.strategy.client_weight(client))
        self.total.add_(delta.to(torch.float64), alpha=weight)
        self.weight += weight

    def reduce(self) -> None:
        """Every rank: add the sums into rank 0's."""
        dist.reduce(self.total, 0)
        dist.reduce(self.weight, 0)

    def finish(self) -> torch.Tensor:
        if not float(self.weight) > 0:
            raise ValueError("aggregation weights must sum to a positive number")
        mean = (self.total / self.weight).to(self.global_vector.dtype)
        return self.strategy.server_step(self.global_vector, mean, self.round_idx)


class _Forward:
    """A worker's sink: each update (a copy) and failure goes to rank 0 without blocking;
    with ``summed``, updates are checked and added to this rank's sums instead, and only
    the client's report goes to rank 0."""

    def __init__(self, summed: SummedRound | None = None) -> None:
        self.summed = summed
        self.pending: list[Any] = []

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        if self.summed is not None:
            if all_finite(delta):
                self.summed.add(client, delta)
                self.pending += isend_object(("summed", client), 0)
            else:
                failure = ClientFailure(client.client_id, "update has NaN or Inf values")
                self.pending += isend_object(("failed", failure), 0)
            return
        self.pending += isend_object(("update", client), 0)
        copy = delta.detach().clone()
        self.pending.append((dist.isend(copy, 0), copy))

    def fail(self, failure: ClientFailure) -> None:
        self.pending += isend_object(("failed", failure), 0)

    def end_chunk(self) -> None:
        self.pending += isend_object(("end", None), 0)

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def _wait(pending: list[Any]) -> None:
    for work, _ in pending:
        work.wait()


def _portable(task: ClientTask) -> ClientTask:
    """``task`` with its lazy per-client vectors evaluated (on the CPU), to be pickled."""

    def cpu(vector: Any) -> Any:
        value = resolve(vector)
        return None if value is None else value.detach().cpu()

    return replace(task, correction=cpu(task.correction), step_correction=cpu(task.step_correction))


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


__all__ = ["DistributedEngine", "SummedRound"]
