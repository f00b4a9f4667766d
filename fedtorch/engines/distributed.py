"""Distributed engine: a round's clients trained by several processes (torch.distributed).

The cohort is cut into contiguous chunks of ``chunk_size`` clients, a size that does not
depend on the number of processes. Rank 0 takes the first chunks and the workers the rest,
in contiguous blocks; rank 0's share adapts from round to round so that every rank
finishes at once (rank 0 also handles the workers' updates). Who trains a client does not
change its update, so the split only moves time around. With ``data.silos`` each client
goes to the rank that holds its data. Every rank trains its chunks with the inner engine
(sequential, or vectorized with the chunk as its cohort).

Rank 0, the server, broadcasts the global weights at the start of the round and sends each
worker its clients' tasks (with any per-client state the strategy keeps on the server,
such as SCAFFOLD's c - c_i, evaluated there). Workers send their updates back in batches
(a pickled list of reports and one [rows, P] tensor, at most ``SEND_BUDGET_BYTES`` each):
one message per client would cost a scheduler round trip per client. Rank 0 feeds the
updates to the round's pipeline in cohort order (``aggregation.collective=gather``), so
every strategy, robust ones included, aggregates exactly what the one-process run
aggregates: the final weights are bit-identical whatever the number of processes (with the
same ``torch_threads`` per process; the number of intra-op threads can change float
results). The test set is evaluated by every rank, a share of its batches each, and the
per-batch terms are added on rank 0 in batch order (the one-process figures, bit for bit).
Between rounds the orchestrator starts the next round (:meth:`DistributedEngine.start`)
as soon as this one is aggregated, so the workers train while rank 0 evaluates and
checkpoints (then rank 0 evaluates alone); :meth:`DistributedEngine.finish` completes it.

Failures: a worker whose messages stop for ``distributed.timeout_s`` seconds (hung or
dead) stops the run on rank 0 with an error naming it; a worker that hears nothing from
rank 0 for as long stops likewise. A client that raises on a worker is reported to rank 0
and dropped from the round as in one process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fedtorch.client.trainer import ClientTrainer
from fedtorch.engines.process_group import DistributedError, isend_object, lost_peer, recv_object
from fedtorch.errors import ConfigError
from fedtorch.pipeline.pipeline import UpdatePipeline, all_finite
from fedtorch.results import ClientFailure, ClientResult, ClientTask, resolve

log = logging.getLogger("fedtorch")

COLLECTIVES = ("gather", "allreduce")
# A worker sends its updates to rank 0 in batches of at most this many bytes (two batches
# at most are held: one in flight, one filling).
SEND_BUDGET_BYTES = 64 << 20
# Rank 0's share of a round's work adapts: up when it waited longer than this for the
# workers, down by SHARE_STEP of the round when it did not.
WAIT_SLACK_S = 0.002
SHARE_STEP = 0.02


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
        # start-up with the run's timeout (fedtorch.engines.process_group.start).
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Rank 0's share of each round's work (the rest is split among the workers).
        self._share = 1.0 / self.world
        # A round sent to the workers and not yet finished (start, then finish).
        self._started: tuple[Any, list[float], list[Any], float] | None = None
        # Buffers kept between rounds: a worker's update batches, rank 0's received ones.
        self._send_pool: list[torch.Tensor] = []
        self._received: dict[int, torch.Tensor | None] = {}

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

    def _assign(
        self, tasks: Sequence[ClientTask], shards: Sequence[torch.Tensor]
    ) -> tuple[list[tuple[int, list[ClientTask]]], list[float]]:
        """(rank, chunk) pairs in cohort order, and each rank's work (samples or steps to
        train). Chunks are contiguous runs of ``chunk_size`` clients; rank 0 takes the
        first ones, about ``_share`` of the round's work, and the workers the rest in equal
        contiguous blocks. With silos, a chunk is a run of clients held by one rank, cut at
        ``chunk_size``. Who trains a client does not change its update, so the split only
        moves time around."""
        c = self.chunk_size
        assigned: list[tuple[int, list[ClientTask]]] = []
        if self._owner is not None:
            for task in tasks:
                owner = self._owner(task.client_id)
                if assigned and assigned[-1][0] == owner and len(assigned[-1][1]) < c:
                    assigned[-1][1].append(task)
                else:
                    assigned.append((owner, [task]))
        else:
            chunks = [list(tasks[i : i + c]) for i in range(0, len(tasks), c)]
            costs = [sum(_cost(t, shards) for t in chunk) for chunk in chunks]
            total = float(sum(costs)) or 1.0
            first = self._share * total
            rest = max(self.world - 1, 1)
            bounds = [first + (total - first) * w / rest for w in range(self.world)]
            done = 0.0
            for chunk, cost in zip(chunks, costs):
                middle = done + cost / 2
                owner = next((r for r, b in enumerate(bounds) if middle < b), self.world - 1)
                assigned.append((owner, chunk))
                done += cost
        load = [0.0] * self.world
        for owner, chunk in assigned:
            load[owner] += sum(_cost(t, shards) for t in chunk)
        return assigned, load

    def _adapt(
        self, own: tuple[float, float], handling: float, workers: list[tuple[float, float]]
    ) -> None:
        """Set rank 0's share of the next round so that, had it been used this round,
        every rank would have finished at once: from (seconds, work) of rank 0's clients
        and of each worker's, and the seconds rank 0 spent handling the workers' updates
        (moved half way each round, so a noisy round moves it little)."""
        work = own[1] + sum(w[1] for w in workers)
        seconds = own[0] + sum(w[0] for w in workers)
        if self.world == 1 or work <= 0 or seconds <= 0:
            return
        overall = seconds / work
        rate0 = own[0] / own[1] if own[1] > 0 else overall
        busy = [w for w in workers if w[1] > 0]
        rate_w = sum(w[0] for w in busy) / sum(w[1] for w in busy) if busy else overall
        per_worker = max(rate_w, 1e-12) / (self.world - 1)
        mine = (work * per_worker - handling) / (max(rate0, 1e-12) + per_worker)
        target = min(1.0, max(0.0, mine / work))
        self._share = 0.5 * self._share + 0.5 * target

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
        self.start(tasks, shards, global_state, global_vector, round_idx)
        self.finish(trainer, shards, global_state, global_vector, round_idx, sink)

    def start(
        self,
        tasks: Sequence[ClientTask],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
    ) -> None:
        """Rank 0: send the round's weights and the workers' clients (they start training);
        :meth:`finish` trains rank 0's own clients and gathers the updates."""
        assigned, load = self._assign(tasks, shards)
        self._announce("round", round_idx)
        self._broadcast_weights(global_state, global_vector)
        pending = []
        for worker in range(1, self.world):
            mine = [
                ([_portable(t) for t in chunk], _next_owner(assigned, i) != worker)
                for i, (owner, chunk) in enumerate(assigned)
                if owner == worker
            ]
            pending += isend_object(mine, worker)
        self._started = (assigned, load, pending, time.perf_counter())

    def finish(
        self,
        trainer: ClientTrainer,
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
        sink: UpdatePipeline,
    ) -> None:
        """Rank 0: train its own chunks of the started round and feed every update to
        ``sink`` in cohort order."""
        assigned, load, pending, sent_at = self._started
        self._started = None
        # Seconds rank 0 spent on other work while the workers trained (the previous
        # round's evaluation when the round was started early): part of its load.
        elsewhere = time.perf_counter() - sent_at
        inboxes = {
            worker: _Inbox(global_vector, self._received.get(worker))
            for worker in range(1, self.world)
        }
        own_seconds, start = 0.0, time.perf_counter()
        for owner, chunk in assigned:
            if owner == 0:
                began = time.perf_counter()
                self.inner.run(trainer, chunk, shards, global_state, global_vector, round_idx, sink)
                own_seconds += time.perf_counter() - began
            else:
                self._receive(owner, chunk, round_idx, inboxes[owner], sink)
        busy = [self._receive(w, [], round_idx, inboxes[w], sink) for w in inboxes]
        handling = time.perf_counter() - start - own_seconds + elsewhere
        handling -= sum(inbox.waited for inbox in inboxes.values())
        self._received = {w: inbox.batch for w, inbox in inboxes.items()}
        for work, _ in pending:
            work.wait()
        if self.collective == "allreduce":
            sink.aggregator.reduce()
        if self._owner is None:
            workers = [(b, load[w + 1]) for w, b in enumerate(busy)]
            self._adapt((own_seconds, load[0]), max(0.0, handling), workers)

    def _receive(
        self,
        owner: int,
        chunk: list[ClientTask],
        round_idx: int,
        inbox: _Inbox,
        sink: UpdatePipeline,
    ) -> float:
        """Feed one worker's chunk to ``sink``, report by report, until its end mark (or,
        after its last chunk, the seconds it spent training this round, returned)."""
        try:
            while True:
                if not inbox.items:
                    inbox.fill(owner)
                kind, payload, row = inbox.items.popleft()
                if kind == "end":
                    return 0.0
                if kind == "busy":
                    return payload
                if kind == "failed":
                    sink.fail(payload)
                elif kind == "summed":
                    sink.add_elsewhere(payload)
                else:
                    sink.add(payload, row)
        except RuntimeError as exc:
            clients = ", ".join(str(t.client_id) for t in chunk)
            raise lost_peer(
                f"distributed: round {round_idx}: rank {owner} did not deliver the updates of "
                f"clients {clients} within distributed.timeout_s={self.timeout_s:g} (hung or "
                f"dead): {_first_line(exc)}"
            ) from None

    def evaluate_shared(
        self,
        global_state: Mapping[str, torch.Tensor],
        count: int,
        here: Callable[[list[int]], torch.Tensor],
    ) -> list[torch.Tensor]:
        """Rank 0: the global weights' evaluation terms on each of ``count`` test batches,
        the batches shared among the ranks (rank 0, busy with the rest of the round, takes
        the fewest); returned in batch order."""
        try:
            self._announce("evaluate", count)
            for tensor in global_state.values():
                dist.broadcast(tensor, 0)
        except (RuntimeError, DistributedError, KeyboardInterrupt) as exc:
            # A worker is gone (or stopping with rank 0): rank 0 holds the test set, so the
            # round's evaluation finishes here; the next round's start reports the loss
            # (or the deferred interrupt checkpoints this round).
            log.warning("distributed: evaluating on rank 0 alone: %s", _first_line(exc))
            return list(here(list(range(count))))
        terms: list[torch.Tensor | None] = [None] * count
        mine = _eval_batches(count, self.world, 0)
        for b, row in zip(mine, here(mine)):
            terms[b] = row
        for worker in range(1, self.world):
            theirs = _eval_batches(count, self.world, worker)
            try:
                rows = recv_object(worker)
            except RuntimeError as exc:
                # Rank 0 holds the test set too: finish the round's evaluation here; the
                # next round's start reports the lost rank (or the stop that took it).
                log.warning(
                    "distributed: rank %d did not send its share of the evaluation (%s); "
                    "evaluating it on rank 0",
                    worker,
                    _first_line(exc),
                )
                rows = here(theirs)
            for b, row in zip(theirs, rows):
                terms[b] = row
        return terms

    def evaluate_silos(
        self,
        global_state: Mapping[str, torch.Tensor],
        here: Callable[[], dict[int, torch.Tensor]],
    ) -> dict[int, torch.Tensor]:
        """Rank 0, ``data.silos``: every rank evaluates the global weights on its silo's
        test split; returns each silo's evaluation totals."""
        self._announce("evaluate_silos", 0)
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
        evaluate_batches: Callable[[list[int]], torch.Tensor] | None = None,
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
                if kind in ("evaluate", "evaluate_silos"):
                    for tensor in global_state.values():
                        dist.broadcast(tensor, 0)
                    if kind == "evaluate_silos":
                        if evaluate_here is None:
                            raise DistributedError("rank 0 asked for an evaluation on no silo")
                        result: Any = evaluate_here()
                    else:
                        if evaluate_batches is None:
                            raise DistributedError("rank 0 asked for an evaluation; none given")
                        result = evaluate_batches(_eval_batches(round_idx, self.world, self.rank))
                    _wait(isend_object(result, 0))
                    continue
                self._broadcast_weights(global_state, global_vector)
                chunks = recv_object(0)
            except RuntimeError as exc:
                raise lost_peer(
                    f"distributed: rank {self.rank} heard nothing from rank 0 within "
                    f"distributed.timeout_s={self.timeout_s:g} (hung or dead): {_first_line(exc)}"
                ) from None
            summed = SummedRound(strategy, global_vector, round_idx)
            rows = sum(len(chunk) for chunk, _ in chunks)
            forward = _Forward(
                global_vector,
                rows,
                summed if self.collective == "allreduce" else None,
                self._send_pool,
            )
            start = time.perf_counter()
            for chunk, flush in chunks:
                self.inner.run(
                    trainer, chunk, shards, global_state, global_vector, round_idx, forward
                )
                forward.end_chunk(flush)
            forward.wait(busy=time.perf_counter() - start)
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
    """A worker's sink: updates, failures and chunk ends are sent to rank 0 in batches (a
    pickled list of reports, then one [rows, P] tensor of updates), each sent without
    blocking once it holds ``SEND_BUDGET_BYTES`` of updates or rank 0 needs it (the end of
    a run of this rank's chunks); one batch is in flight while the next fills, so a worker
    holds at most two batches. With ``summed``, updates are checked and added to this
    rank's sums instead, and only the clients' reports go to rank 0."""

    def __init__(
        self,
        like: torch.Tensor,
        clients: int,
        summed: SummedRound | None = None,
        pool: list[torch.Tensor] | None = None,
    ) -> None:
        self.summed = summed
        # Batch buffers kept from round to round (fresh 64 MB every round costs page faults).
        self.pool = pool if pool is not None else []
        per_row = like.numel() * like.element_size()
        self.capacity = max(1, min(clients, SEND_BUDGET_BYTES // max(per_row, 1)))
        self.like = like
        # The batch being filled, the one in flight, and a free one to fill next.
        self.filling: torch.Tensor | None = None
        self.sending: torch.Tensor | None = None
        self.spare: torch.Tensor | None = None
        self.items: list[tuple[str, Any]] = []
        self.rows = 0
        self.in_flight: list[Any] = []

    def _next_row(self) -> torch.Tensor:
        if self.filling is None:
            self.filling = self.spare if self.spare is not None else self._from_pool()
            self.spare = None
            if self.filling is None:
                self.filling = torch.empty(self.capacity, self.like.numel(), dtype=self.like.dtype)
        return self.filling[self.rows]

    def _from_pool(self) -> torch.Tensor | None:
        for i, buffer in enumerate(self.pool):
            if buffer.shape[0] >= self.capacity and buffer.shape[1] == self.like.numel():
                return self.pool.pop(i)[: self.capacity]
        return None

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        if self.summed is not None:
            if all_finite(delta):
                self.summed.add(client, delta)
                self.items.append(("summed", client))
            else:
                failure = ClientFailure(client.client_id, "update has NaN or Inf values")
                self.items.append(("failed", failure))
            return
        self._next_row().copy_(delta.detach().reshape(-1))
        self.rows += 1
        self.items.append(("update", client))
        if self.rows == self.capacity:
            self.flush()

    def fail(self, failure: ClientFailure) -> None:
        self.items.append(("failed", failure))

    def end_chunk(self, flush: bool) -> None:
        self.items.append(("end", None))
        if flush:
            self.flush()

    def flush(self) -> None:
        """Send the batch gathered so far, once the previous one has gone."""
        if not self.items:
            return
        _wait(self.in_flight)
        self.spare, self.sending = self.sending, None
        self.in_flight = isend_object((self.items, self.rows), 0)
        if self.rows:
            batch = self.filling[: self.rows]
            self.in_flight.append((dist.isend(batch, 0), batch))
            self.sending, self.filling = self.filling, None
        self.items, self.rows = [], 0

    def wait(self, busy: float) -> None:
        """Send what is left, with the seconds this rank trained (rank 0 balances the
        next round with them), and wait until it has gone."""
        self.items.append(("busy", busy))
        self.flush()
        _wait(self.in_flight)
        self.in_flight = []
        kept = [b for b in (self.filling, self.sending, self.spare) if b is not None]
        self.pool[:] = kept[:2]


class _Inbox:
    """Rank 0's reports from one worker, received a batch at a time (the batch tensor is
    reused: its rows are lent to the pipeline, which does not keep them)."""

    def __init__(self, like: torch.Tensor, batch: torch.Tensor | None = None) -> None:
        self.like = like
        self.items: deque[tuple[str, Any, torch.Tensor | None]] = deque()
        self.batch = batch
        self.waited = 0.0  # seconds spent receiving (waiting for the worker included)

    def fill(self, owner: int) -> None:
        start = time.perf_counter()
        try:
            self._fill(owner)
        finally:
            self.waited += time.perf_counter() - start

    def _fill(self, owner: int) -> None:
        items, rows = recv_object(owner)
        if rows:
            fits = self.batch is not None and self.batch.shape[1] == self.like.numel()
            if not fits or self.batch.shape[0] < rows or self.batch.dtype != self.like.dtype:
                self.batch = torch.empty(rows, self.like.numel(), dtype=self.like.dtype)
            dist.recv(self.batch[:rows], owner)
        row = 0
        for kind, payload in items:
            view = None
            if kind == "update":
                view = self.batch[row]
                row += 1
            self.items.append((kind, payload, view))


def _eval_batches(count: int, world: int, rank: int) -> list[int]:
    """The test batches ``rank`` evaluates: batch b on rank (world - 1 - b) mod world, so
    rank 0 gets the fewest."""
    return [b for b in range(count) if (world - 1 - b) % world == rank]


def _cost(task: ClientTask, shards: Sequence[torch.Tensor]) -> float:
    """A client's expected training work: its local steps if fixed, else its samples."""
    return (
        float(task.steps) if task.steps is not None else float(max(1, len(shards[task.client_id])))
    )


def _next_owner(assigned: list[tuple[int, list[ClientTask]]], index: int) -> int | None:
    return assigned[index + 1][0] if index + 1 < len(assigned) else None


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
