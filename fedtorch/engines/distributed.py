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
(a ``updates`` message: a header listing the reports, and one [rows, P] tensor, at most
``SEND_BUDGET_BYTES`` each): one message per client would cost a scheduler round trip per
client. Every message is tensors and a typed, versioned header
(:mod:`fedtorch.engines.messages`); nothing is unpickled. Rank 0 feeds the updates to the
round's pipeline in cohort order (``aggregation.collective=gather``), so every strategy,
robust ones included, aggregates exactly what the one-process run aggregates: the final
weights are bit-identical whatever the number of processes (with the same
``torch_threads`` per process; the number of intra-op threads can change float results).
The client's side of each update (:class:`~fedtorch.server.round_pipeline.RoundClientSide`:
the simulated attack's rewrite, compression's encode and decode, DP clipping and local noise,
in that order, as in one process) runs on the rank that trained the client; an ``updates``
row is what it sent (clipped and noised under DP, the decoded update under compression),
with a receipt (encoded bytes, adaptive clipping's bit) in its report, and rank 0 runs only
the server's steps (:meth:`UpdatePipeline.add_sent`). Rank 0 sends the round's clip norm
with the tasks (adaptive clipping moves it on rank 0). Noise is drawn from (seed, round,
client), or the OS CSPRNG in ``privacy.secure_mode``, so with seeded noise the run is
bit-identical to one process. What cannot run on the worker yet is refused before
training (:meth:`DistributedEngine.check_client_side`): secure aggregation and compression's
error feedback (``aggregation.collective=allreduce`` with any per-update step is refused by
:func:`fedtorch.config.validate.check_engine_and_attack`).
The test set is evaluated by every rank, a share of its batches each, and the per-batch
terms are added on rank 0 in batch order (the one-process figures, bit for bit). Between
rounds the orchestrator starts the next round (:meth:`DistributedEngine.start`) as soon as
this one is aggregated, so the workers train while rank 0 evaluates and checkpoints (then
rank 0 evaluates alone); :meth:`DistributedEngine.finish` completes it.

What rank 0 accepts from a worker (each violation stops the run with one line naming the
rank and what it sent, a :class:`~fedtorch.engines.messages.MessageError`): reports of
exactly the clients it assigned that worker this round, each once, chunk by chunk in the
order sent, each chunk closed by its end mark; sample counts equal to the sizes rank 0
knows (the shards it holds, the sizes a silo announced at start-up), which are what it
aggregates with; counters of the model's ``max`` keys and metrics from an allow-list; an
update block of exactly the rows reported; evaluation terms of the batches it asked for;
silo totals only of the silo that rank serves; allreduce sums that are finite and whose
weights match the sizes rank 0 knows. A worker checks what rank 0 sends likewise.

Failures: a worker whose messages stop for ``distributed.timeout_s`` seconds (hung or
dead) stops the run on rank 0 with an error naming it; a worker that hears nothing from
rank 0 for as long stops likewise. A client that raises on a worker is reported to rank 0
and dropped from the round as in one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fedtorch.client.trainer import ClientTrainer
from fedtorch.data.tasks import Classification
from fedtorch.engines import messages
from fedtorch.engines.messages import MessageError
from fedtorch.engines.process_group import DistributedError, lost_peer
from fedtorch.errors import ConfigError
from fedtorch.pipeline.pipeline import ClientSide, RejectedUpdate, UpdatePipeline, all_finite
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
# The ClientTask fields a ``tasks`` message carries; a task with another field set (not at
# its default) cannot be sent until the schema has a place for it.
TASK_FIELDS = (
    "client_id",
    "steps",
    "correction",
    "step_correction",
    "prox_mu",
    "flip_labels",
    "initial_loss",
)


class DistributedEngine:
    """See the module docstring.

    Args:
        inner: the engine each rank trains its chunks with.
        chunk_size: clients per chunk (contiguous in cohort order).
        timeout_s: seconds a rank waits for another before failing the run.
        collective: how updates reach the aggregator: ``gather`` (each one to rank 0, in
            cohort order) or ``allreduce`` (each rank sums its clients' weighted updates in
            float64 and the sums are added on rank 0; plain weighted means only).

    Raises:
        ConfigError: a bad ``chunk_size`` or ``collective``, or no process group.
        DistributedError: a rank is gone or silent past ``timeout_s``.
        MessageError: a rank sent what this rank cannot accept (see the module docstring).
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
                "aggregation.collective",
                f"must be {' or '.join(COLLECTIVES)}, got {collective!r}",
            )
        if not dist.is_initialized():
            raise ConfigError(
                "engine",
                "engine=distributed runs under torchrun: fedtorch-run --nproc_per_node=N -- "
                "OVERRIDES, or torchrun --nproc_per_node=N -m fedtorch.train OVERRIDES",
            )
        self.inner, self.chunk_size, self.timeout_s = inner, chunk_size, float(timeout_s)
        self.collective = collective
        # data.silos: the rank holding each client's data (None: any rank, by chunk), and
        # the silo each rank serves (where the placement says).
        self._owner: Callable[[int], int] | None = None
        self._silo_of_rank: dict[int, int] | None = None

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
        # DP settings (check_client_side): rank 0 sends the round's clip norm, workers clip
        # with it.
        self._privacy: Any = None

    def check_client_side(self, *, compression: Any, privacy: Any, secure_agg: Any) -> None:
        """Refuse the client-side steps that cannot run on the rank that trained the client
        yet (rather than run them on rank 0), and keep the DP settings for the clip norm.

        Error feedback is refused: a client's residual would have to live where the client
        trains, but clients move between ranks from round to round (load balancing), and
        shipping the residual through rank 0 would show rank 0 the coordinates the client
        did not send (p - C(p), un-noised)."""
        self._privacy = privacy if privacy.enabled else None
        if secure_agg.enabled:
            raise ConfigError(
                "secure_aggregation.enabled",
                "engine=distributed cannot mask on the ranks that train the clients yet (it "
                "would mask on rank 0, which then sees every unmasked update); use "
                "engine=sequential or engine=vectorized",
            )
        if compression.error_feedback:
            raise ConfigError(
                "compression.error_feedback",
                "engine=distributed cannot keep a client's residual where it trains (clients "
                "move between ranks); use error_feedback=false or engine=sequential",
            )

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
        its data, instead of spreading chunks over the ranks. An ``owner`` that also has
        ``rank_of_silo`` (:class:`fedtorch.data.silos.Placement`) says which silo each
        rank serves: its evaluation totals are accepted from that rank only."""
        self._owner = owner
        rank_of_silo = getattr(owner, "rank_of_silo", None)
        if rank_of_silo is not None:
            self._silo_of_rank = {int(r): s for s, r in enumerate(rank_of_silo)}

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

    def _known_size(
        self, trainer: ClientTrainer, shards: Sequence[torch.Tensor], client_id: int
    ) -> int | None:
        """The size (FedAvg weight) rank 0 knows for ``client_id``: from its shard where
        rank 0 holds the client's rows (every client without silos), from the size its
        silo announced where the unit is samples; None where neither holds (another
        silo's client counted in tokens: the report is taken as sent)."""
        shard = shards[client_id]
        held = self._owner is None or self._owner(client_id) == 0
        size = getattr(trainer, "client_size", None)
        if size is None:
            return len(shard) if held else None
        if held or isinstance(getattr(trainer, "task", None), Classification):
            return int(size(shard))
        return None

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
                (chunk, _next_owner(assigned, i) != worker)
                for i, (owner, chunk) in enumerate(assigned)
                if owner == worker
            ]
            clip_norm = None if self._privacy is None else float(self._privacy.clip_norm)
            header, blocks = _tasks_message(mine, round_idx, global_vector, clip_norm)
            pending += messages.send("tasks", header, blocks, worker)
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
        elapsed = time.perf_counter() - sent_at
        counter_keys = list(getattr(trainer, "counter_keys", ()))
        inboxes = {
            worker: _Inbox(
                _Ledger(
                    worker,
                    round_idx,
                    [[t.client_id for t in chunk] for owner, chunk in assigned if owner == worker],
                ),
                global_vector,
                {k: global_state[k] for k in counter_keys},
                lambda c: self._known_size(trainer, shards, c),
                self._received.get(worker),
            )
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
        handling = time.perf_counter() - start - own_seconds + elapsed
        handling -= sum(inbox.waited for inbox in inboxes.values())
        self._received = {w: inbox.batch for w, inbox in inboxes.items()}
        for work, _ in pending:
            work.wait()
        if self.collective == "allreduce":
            summed = sink.aggregator
            summed.reduce()
            expected = {}
            for worker, inbox in inboxes.items():
                weight = 0.0  # added in the order the worker added them: equal bit for bit
                for client in inbox.summed:
                    weight += float(summed.strategy.client_weight(client))
                expected[worker] = weight
            summed.check(expected, round_idx)
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
        after its last chunk, the seconds it spent training this round, returned). The
        reports were checked against what was assigned as they arrived (:class:`_Ledger`)."""
        try:
            while True:
                if not inbox.items:
                    inbox.fill(owner)
                kind, payload, row = inbox.items.popleft()
                if kind == "update":
                    result, receipt = payload
                    try:
                        sink.add_sent(result, row, receipt)
                    except ValueError as exc:
                        raise MessageError(owner, f"a report of {exc}") from None
                    continue
                if kind == "end":
                    return 0.0
                if kind == "busy":
                    return payload
                if kind == "failed":
                    sink.fail(payload)
                elif kind == "summed":
                    sink.add_elsewhere(payload)
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
        own = here(mine)
        for b, row in zip(mine, own):
            terms[b] = row
        for worker in range(1, self.world):
            theirs = _eval_batches(count, self.world, worker)
            try:
                message = messages.receive(worker, ("eval_terms",), messages.HEADER_BASE_BYTES)
                if message.fields["batches"] != count:
                    raise MessageError(
                        worker,
                        f"evaluation terms of {message.fields['batches']} test batches where "
                        f"rank 0 asked for {count}",
                    )
                rows = messages.receive_payload(
                    message, 0, own.dtype, (len(theirs), *own.shape[1:])
                )
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
        test split; returns each silo's evaluation totals (a silo's only from the rank
        serving it)."""
        self._announce("evaluate_silos", 0)
        for tensor in global_state.values():
            dist.broadcast(tensor, 0)
        totals = dict(here())
        like = next(iter(totals.values()))
        for worker in range(1, self.world):
            try:
                message = messages.receive(worker, ("silo_totals",), messages.HEADER_BASE_BYTES)
                silo = message.fields["silo"]
                served = None if self._silo_of_rank is None else self._silo_of_rank.get(worker)
                if served is not None and silo != served:
                    raise MessageError(
                        worker, f"evaluation totals of silo {silo}; it serves silo {served}"
                    )
                if silo in totals:
                    raise MessageError(
                        worker, f"evaluation totals of silo {silo}, which another rank serves"
                    )
                totals[silo] = messages.receive_payload(message, 0, like.dtype, like.shape)
            except RuntimeError as exc:
                raise lost_peer(
                    f"distributed: rank {worker} did not send its silo's evaluation within "
                    f"distributed.timeout_s={self.timeout_s:g} (hung or dead): {_first_line(exc)}"
                ) from None
        return totals

    def _announce(self, kind: str, value: int) -> None:
        """Rank 0: check every worker is there (gloo's monitored barrier names the ones
        that are not; before round 1 this also bounds start-up), then tell them what comes
        next."""
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        except RuntimeError as exc:
            raise lost_peer(
                f"distributed: round {value}: not every rank is there after "
                f"distributed.timeout_s={self.timeout_s:g}: {_first_line(exc)}"
            ) from None
        messages.announce(kind, value)

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
        test_batches: int | None = None,
        client_side: Callable[[int], ClientSide] | None = None,
    ) -> None:
        """A worker's loop: each round, receive the weights and this rank's chunks, train
        them, send the updates; with silos, evaluate the weights rank 0 sends on this
        rank's silo when asked (``evaluate_here``); return when rank 0 says stop.
        ``test_batches``: the number of test batches this rank holds (an evaluation
        announced for another number is refused). ``client_side(round)``: the client's
        steps of a round, run on each update before it is sent."""
        limits = {"evaluate": test_batches} if test_batches is not None else {}
        counter_keys = list(getattr(trainer, "counter_keys", ()))
        while True:
            try:
                dist.monitored_barrier(
                    timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True
                )
                kind, value = messages.hear(limits)
                if kind == "stop":
                    return
                if kind in ("evaluate", "evaluate_silos"):
                    for tensor in global_state.values():
                        dist.broadcast(tensor, 0)
                    if kind == "evaluate_silos":
                        if evaluate_here is None:
                            raise MessageError(0, "a request to evaluate a silo; none is held here")
                        for silo, totals in evaluate_here().items():
                            _wait(messages.send("silo_totals", {"silo": silo}, [totals], 0))
                    else:
                        if evaluate_batches is None:
                            raise MessageError(0, "a request to evaluate test batches; none given")
                        if test_batches is not None and value != test_batches:
                            raise MessageError(
                                0,
                                f"a request to evaluate {value} test batches; {test_batches} here",
                            )
                        terms = evaluate_batches(_eval_batches(value, self.world, self.rank))
                        _wait(messages.send("eval_terms", {"batches": value}, [terms], 0))
                    continue
                round_idx = value
                self._broadcast_weights(global_state, global_vector)
                chunks = self._receive_tasks(round_idx, shards, global_vector)
                side = client_side(round_idx) if client_side is not None else None
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
                round_idx,
                counter_keys,
                summed if self.collective == "allreduce" else None,
                self._send_pool,
                side,
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

    def _receive_tasks(
        self, round_idx: int, shards: Sequence[torch.Tensor], global_vector: torch.Tensor
    ) -> list[tuple[list[ClientTask], bool]]:
        """A worker: this round's chunks from rank 0, checked: clients of this run, each
        once, held by this rank (silos); per-client vectors of the model's size."""
        cap = messages.HEADER_BASE_BYTES + messages.TASK_BYTES * len(shards)
        message = messages.receive(0, ("tasks",), cap)
        if message.fields["round"] != round_idx:
            raise MessageError(
                0, f"the tasks of round {message.fields['round']} during round {round_idx}"
            )
        clip_norm = message.fields["clip_norm"]
        if (clip_norm is None) != (self._privacy is None):
            raise MessageError(
                0, f"a clip norm of {clip_norm} where this rank's privacy settings differ"
            )
        if clip_norm is not None:
            self._privacy.clip_norm = clip_norm  # rank 0's, moved by adaptive clipping
        seen: set[int] = set()
        counts = {"correction": 0, "step_correction": 0}
        for chunk in message.fields["chunks"]:
            for task in chunk["tasks"]:
                client = task["client"]
                if client >= len(shards) or client in seen:
                    raise MessageError(
                        0, f"a task for client {client}: not a client of this run, or sent twice"
                    )
                if self._owner is not None and self._owner(client) != self.rank:
                    raise MessageError(0, f"a task for client {client}, whose data is not here")
                seen.add(client)
                for name in counts:
                    counts[name] += task[name]
        size = global_vector.numel()
        blocks = [
            messages.receive_payload(
                message, i, [messages.DTYPES[d] for d in messages.FLOAT_DTYPES], (n, size)
            )
            for i, n in enumerate(counts.values())
        ]
        rows = [iter(block) for block in blocks]
        return [
            (
                [
                    ClientTask(
                        client_id=t["client"],
                        steps=t["steps"],
                        correction=next(rows[0]) if t["correction"] else None,
                        step_correction=next(rows[1]) if t["step_correction"] else None,
                        prox_mu=float(t["prox_mu"]),
                        flip_labels=t["flip_labels"],
                        initial_loss=t["initial_loss"],
                    )
                    for t in chunk["tasks"]
                ],
                chunk["flush"],
            )
            for chunk in message.fields["chunks"]
        ]


class SummedRound:
    """``aggregation.collective=allreduce``: one rank's sum of w_k * delta_k and of w_k over
    the clients it trained, in float64 (w_k: the strategy's client weight); :meth:`reduce`
    adds every rank's sums on rank 0, whose :meth:`check` refuses a non-finite sum or a
    rank whose weights differ from the sizes rank 0 knows, and whose :meth:`finish`
    applies the strategy's server step to the weighted mean. The sums group the clients by
    rank, so the result equals the one-process run's to float rounding, not bit for bit."""

    def __init__(self, strategy: Any, global_vector: torch.Tensor, round_idx: int) -> None:
        self.strategy, self.global_vector, self.round_idx = strategy, global_vector, round_idx
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.total = torch.zeros(
            global_vector.numel(), dtype=torch.float64, device=global_vector.device
        )
        # Row 0: each rank's sum of weights, at its own index (the reduce keeps them apart);
        # row 1: 1 where a rank's own sum is not finite.
        self.stats = torch.zeros(2, self.world, dtype=torch.float64, device=global_vector.device)

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        weight = float(self.strategy.client_weight(client))
        self.total.add_(delta.to(torch.float64), alpha=weight)
        self.stats[0, self.rank] += weight

    def reduce(self) -> None:
        """Every rank: add the sums into rank 0's."""
        self.stats[1, self.rank] = 0.0 if all_finite(self.total) else 1.0
        dist.reduce(self.total, 0)
        dist.reduce(self.stats, 0)

    def check(self, expected: Mapping[int, float], round_idx: int) -> None:
        """Rank 0, after :meth:`reduce`: every worker's weights equal ``expected[rank]``
        (its summed clients' weights from the sizes rank 0 knows) and the sum is finite."""
        weights, flags = self.stats[0].tolist(), self.stats[1].tolist()
        for rank in range(1, self.world):
            if flags[rank] != 0.0:
                raise MessageError(rank, f"a non-finite allreduce sum in round {round_idx}")
            want = expected.get(rank, 0.0)
            if not math.isclose(weights[rank], want, rel_tol=1e-9, abs_tol=1e-12):
                raise MessageError(
                    rank,
                    f"allreduce client weights adding up to {weights[rank]:g} in round "
                    f"{round_idx}; the sizes rank 0 knows of the clients it reported give {want:g}",
                )
        if not all_finite(self.total):
            ranks = ", ".join(str(r) for r in range(1, self.world))
            raise MessageError(
                ranks, f"a non-finite allreduce sum in round {round_idx} (added from all ranks)"
            )

    def finish(self) -> torch.Tensor:
        weight = float(self.stats[0].sum())
        if not weight > 0:
            raise ValueError("aggregation weights must sum to a positive number")
        mean = (self.total / weight).to(self.global_vector.dtype)
        return self.strategy.server_step(self.global_vector, mean, self.round_idx)


class _Forward:
    """A worker's sink: updates (after ``client_side``, the client's steps), failures and
    chunk ends are sent to rank 0 in batches (an
    ``updates`` message: the reports, then one [rows, P] tensor of updates), each sent
    without blocking once it holds ``SEND_BUDGET_BYTES`` of updates or rank 0 needs it
    (the end of a run of this rank's chunks); one batch is in flight while the next fills,
    so a worker holds at most two batches. With ``summed``, updates are checked and added
    to this rank's sums instead, and only the clients' reports go to rank 0."""

    def __init__(
        self,
        like: torch.Tensor,
        clients: int,
        round_idx: int,
        counter_keys: Sequence[str] = (),
        summed: SummedRound | None = None,
        pool: list[torch.Tensor] | None = None,
        client_side: ClientSide | None = None,
    ) -> None:
        self.summed, self.round_idx, self.counter_keys = summed, round_idx, list(counter_keys)
        self.client_side = client_side
        # Batch buffers kept from round to round (fresh 64 MB every round costs page faults).
        self.pool = pool if pool is not None else []
        per_row = like.numel() * like.element_size()
        self.capacity = max(1, min(clients, SEND_BUDGET_BYTES // max(per_row, 1)))
        self.like = like
        # The batch being filled, the one in flight, and a free one to fill next.
        self.filling: torch.Tensor | None = None
        self.sending: torch.Tensor | None = None
        self.spare: torch.Tensor | None = None
        self.items: list[dict[str, Any]] = []
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
                self.items.append(_report("summed", client, self.counter_keys))
            else:
                self.fail(ClientFailure(client.client_id, "update has NaN or Inf values"))
            return
        update, receipt = delta, {}
        if self.client_side is not None:
            try:
                update, receipt = self.client_side.run(client, delta)
            except RejectedUpdate as rejected:
                self.fail(ClientFailure(client.client_id, str(rejected)))
                return
        self._next_row().copy_(update.detach().reshape(-1))
        self.rows += 1
        self.items.append({**_report("update", client, self.counter_keys), **receipt})
        if self.rows == self.capacity:
            self.flush()

    def fail(self, failure: ClientFailure) -> None:
        reason = messages.printable(failure.reason)
        self.items.append({"t": "failed", "client": failure.client_id, "reason": reason})

    def end_chunk(self, flush: bool) -> None:
        self.items.append({"t": "end"})
        if flush:
            self.flush()

    def flush(self) -> None:
        """Send the batch gathered so far, once the previous one has gone."""
        if not self.items:
            return
        self._wait_in_flight()
        self.spare, self.sending = self.sending, None
        if self.rows:
            batch = self.filling[: self.rows]
            self.sending, self.filling = self.filling, None
        else:
            batch = torch.empty(0, self.like.numel(), dtype=self.like.dtype)
        header = {"round": self.round_idx, "items": self.items}
        try:
            self.in_flight = messages.send("updates", header, [batch], 0)
        except RuntimeError as exc:
            raise self._lost(exc) from None
        self.items, self.rows = [], 0

    def wait(self, busy: float) -> None:
        """Send what is left, with the seconds this rank trained (rank 0 balances the
        next round with them), and wait until it has gone."""
        self.items.append({"t": "busy", "seconds": max(0.0, float(busy))})
        self.flush()
        self._wait_in_flight()
        self.in_flight = []
        kept = [b for b in (self.filling, self.sending, self.spare) if b is not None]
        self.pool[:] = kept[:2]

    def _wait_in_flight(self) -> None:
        try:
            _wait(self.in_flight)
        except RuntimeError as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: RuntimeError) -> Exception:
        """Rank 0 did not take this worker's updates (gone: it stopped, or crashed)."""
        return lost_peer(
            f"distributed: round {self.round_idx}: rank {dist.get_rank()} could not send its "
            f"updates to rank 0 (gone or hung): {_first_line(exc)}"
        )


class _Ledger:
    """What rank 0 assigned one worker in a round, walked through as its reports arrive:
    each chunk's clients reported once each (an update, a sum or a failure, in any order
    within the chunk), then the chunk's end mark, chunks in the order sent, then the
    worker's busy seconds. Anything else is a :class:`MessageError` naming the worker."""

    def __init__(self, worker: int, round_idx: int, chunks: Sequence[Sequence[int]]) -> None:
        self.worker, self.round_idx = worker, round_idx
        self.chunks = deque(list(chunk) for chunk in chunks)
        self.assigned = {c for chunk in chunks for c in chunk}
        self.reported: set[int] = set()
        self.done = False

    @property
    def clients_left(self) -> int:
        return len(self.assigned) - len(self.reported)

    @property
    def items_left(self) -> int:
        """Reports still owed: a client's each, a chunk's end each, the busy seconds."""
        return self.clients_left + len(self.chunks) + (0 if self.done else 1)

    def take(self, item: Mapping[str, Any]) -> None:
        """Accept one report (already checked against the ``updates`` schema)."""
        kind, r = item["t"], self.round_idx
        if self.done:
            raise self._error(f"a report ({kind}) after its last one of round {r}")
        if kind == "busy":
            if self.chunks:
                owed = ", ".join(
                    str(c) for chunk in self.chunks for c in chunk if c not in self.reported
                )
                raise self._error(
                    f"its last report of round {r} with {len(self.chunks)} chunk(s) not ended"
                    + (f" (clients {owed} unreported)" if owed else "")
                )
            self.done = True
            return
        if not self.chunks:
            raise self._error(f"a report ({kind}) after the end of its last chunk of round {r}")
        current = self.chunks[0]
        if kind == "end":
            owed = [c for c in current if c not in self.reported]
            if owed:
                raise self._error(
                    f"the end of a chunk of round {r} without reporting client(s) "
                    f"{', '.join(map(str, owed))}"
                )
            self.chunks.popleft()
            return
        client = item["client"]
        if client in self.reported:
            raise self._error(f"a second report of client {client} in round {r}")
        if client not in current:
            if client in self.assigned:
                raise self._error(
                    f"a report of client {client} in round {r} before the end of the chunk "
                    "sent ahead of it"
                )
            raise self._error(
                f"a report of client {client} in round {r}, a client rank 0 did not assign to it"
            )
        self.reported.add(client)

    def _error(self, problem: str) -> MessageError:
        return MessageError(self.worker, problem)


class _Inbox:
    """Rank 0's reports from one worker in one round, received a batch at a time and
    checked (:class:`_Ledger`) before their update rows are received (the batch tensor is
    reused: its rows are lent to the pipeline, which does not keep them)."""

    def __init__(
        self,
        ledger: _Ledger,
        like: torch.Tensor,
        counters: Mapping[str, torch.Tensor],
        known_size: Callable[[int], int | None],
        batch: torch.Tensor | None = None,
    ) -> None:
        self.ledger, self.like, self.counters, self.known_size = ledger, like, counters, known_size
        self.counter_values = sum(t.numel() for t in counters.values())
        self.items: deque[tuple[str, Any, torch.Tensor | None]] = deque()
        self.summed: list[ClientResult] = []  # allreduce: in the order the worker added them
        self.batch = batch
        self.waited = 0.0  # seconds spent receiving (waiting for the worker included)

    def fill(self, owner: int) -> None:
        start = time.perf_counter()
        try:
            self._fill(owner)
        finally:
            self.waited += time.perf_counter() - start

    def _fill(self, owner: int) -> None:
        ledger = self.ledger
        per_item = messages.ITEM_BYTES + messages.COUNTER_VALUE_BYTES * self.counter_values
        cap = messages.HEADER_BASE_BYTES + per_item * ledger.items_left
        message = messages.receive(owner, ("updates",), cap)
        if message.fields["round"] != ledger.round_idx:
            raise MessageError(
                owner, f"updates of round {message.fields['round']} during round {ledger.round_idx}"
            )
        items = message.fields["items"]
        if not items:
            raise MessageError(owner, f"an empty updates message in round {ledger.round_idx}")
        parsed, receipts = [], []
        for item in items:
            ledger.take(item)
            parsed.append(self._parse(owner, item))
            if item["t"] == "update":
                receipts.append({k: item[k] for k in ("sent_bytes", "within_clip") if k in item})
        rows = sum(1 for item in items if item["t"] == "update")
        size = self.like.numel()
        messages.check_payload(message, 0, self.like.dtype, (rows, size))
        if rows:
            fits = self.batch is not None and self.batch.shape[1] == size
            if not fits or self.batch.shape[0] < rows or self.batch.dtype != self.like.dtype:
                self.batch = torch.empty(rows, size, dtype=self.like.dtype)
            messages.receive_payload(message, 0, self.like.dtype, (rows, size), self.batch[:rows])
        row = 0
        receipts_in_order = iter(receipts)
        for kind, payload in parsed:
            view = None
            if kind == "update":
                view = self.batch[row]
                row += 1
                payload = (payload, next(receipts_in_order))  # with the client side's receipt
            elif kind == "summed":
                self.summed.append(payload)
            self.items.append((kind, payload, view))

    def _parse(self, owner: int, item: Mapping[str, Any]) -> tuple[str, Any]:
        """A checked report as the pipeline takes it: a ClientResult (sizes rank 0 knows,
        counters shaped as the model's ``max`` keys), a ClientFailure, or seconds."""
        kind = item["t"]
        if kind == "end":
            return kind, None
        if kind == "busy":
            return kind, float(item["seconds"])
        if kind == "failed":
            return kind, ClientFailure(item["client"], item["reason"])
        client, samples = item["client"], item["samples"]
        known = self.known_size(client)
        if known is not None and samples != known:
            raise MessageError(
                owner,
                f"client {client} with {samples} samples in round {self.ledger.round_idx}; its "
                f"size known here is {known}",
            )
        values = item["counters"]
        if len(values) != self.counter_values:
            raise MessageError(
                owner,
                f"{len(values)} counter values for client {client}; the model's max keys hold "
                f"{self.counter_values}",
            )
        counters, offset = {}, 0
        for key, like in self.counters.items():
            part = values[offset : offset + like.numel()]
            offset += like.numel()
            if not like.is_floating_point():
                info = torch.iinfo(like.dtype)
                if any(type(v) is not int or not info.min <= v <= info.max for v in part):
                    raise MessageError(
                        owner, f"counter {key} of client {client} out of its {like.dtype}: {part}"
                    )
            counters[key] = torch.tensor(part, dtype=like.dtype, device=like.device).reshape(
                like.shape
            )
        result = ClientResult(client, known if known is not None else samples, counters)
        result.metrics = dict(item["metrics"])
        return kind, result


def _report(kind: str, client: ClientResult, counter_keys: Sequence[str]) -> dict[str, Any]:
    """A client's report as an ``updates`` message carries it."""
    counters: list[int | float] = []
    for key in counter_keys:
        counters += client.counters[key].reshape(-1).tolist()
    return {
        "t": kind,
        "client": int(client.client_id),
        "samples": int(client.num_samples),
        "metrics": {k: _plain(v) for k, v in client.metrics.items()},
        "counters": counters,
    }


def _plain(value: Any) -> int | float:
    """A metric as JSON holds it: an int stays an int, anything else becomes a float."""
    return value if type(value) is int else float(value)


def _tasks_message(
    chunks: Sequence[tuple[Sequence[ClientTask], bool]],
    round_idx: int,
    like: torch.Tensor,
    clip_norm: float | None = None,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The ``tasks`` message of one worker: its chunks (with whether to flush after each),
    the round's DP clip norm (None without DP) and the tasks' per-client vectors, evaluated
    on the CPU, as two [n, P] blocks."""
    vectors: dict[str, list[torch.Tensor]] = {"correction": [], "step_correction": []}
    out = []
    for chunk, flush in chunks:
        entries = []
        for task in chunk:
            for f in fields(task):
                if f.name not in TASK_FIELDS and getattr(task, f.name) != f.default:
                    raise TypeError(
                        f"ClientTask.{f.name} has no place in the tasks message "
                        "(fedtorch/engines/messages.py KINDS)"
                    )
            entry = {
                "client": int(task.client_id),
                "steps": None if task.steps is None else int(task.steps),
                "prox_mu": float(task.prox_mu),
                "flip_labels": bool(task.flip_labels),
                "initial_loss": bool(task.initial_loss),
            }
            for name, found in vectors.items():
                value = resolve(getattr(task, name))
                entry[name] = value is not None
                if value is not None:
                    found.append(value.detach().reshape(-1).cpu())
            entries.append(entry)
        out.append({"flush": bool(flush), "tasks": entries})
    blocks = [
        torch.stack(found) if found else torch.empty(0, like.numel(), dtype=like.dtype)
        for found in vectors.values()
    ]
    return {"round": round_idx, "chunks": out, "clip_norm": clip_norm}, blocks


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


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


__all__ = ["DistributedEngine", "SummedRound"]
