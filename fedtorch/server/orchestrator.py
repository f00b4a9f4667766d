"""The round loop: sample, train locally, aggregate, evaluate, log. Read it top to bottom."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtorch.client.heterogeneity import SystemHeterogeneity
from fedtorch.client.trainer import ClientTrainer
from fedtorch.data.datasets import DataBundle
from fedtorch.engines.process_group import DistributedError
from fedtorch.errors import FedtorchError
from fedtorch.logging.files import RunLock, write_json
from fedtorch.logging.metrics import MetricsLogger
from fedtorch.pipeline.pipeline import UpdatePipeline, all_finite
from fedtorch.privacy.release import PrivateRound
from fedtorch.results import ClientTask, weighted_train_metrics
from fedtorch.server.checkpoint import Interrupted, deferred_interrupt
from fedtorch.server.evaluation import Evaluator
from fedtorch.server.progress import Progress, RunSettings
from fedtorch.server.resume import RunCheckpoints
from fedtorch.server.round_pipeline import RoundPipelines
from fedtorch.server.sampling import sample_cohort
from fedtorch.server.summary import run_summary
from fedtorch.server.traffic import Traffic
from fedtorch.state.layout import StateLayout, aggregate_max
from fedtorch.strategies.base import Strategy

log = logging.getLogger("fedtorch")


@dataclass(kw_only=True, eq=False)
class Orchestrator:
    """Runs federated training for ``settings.rounds`` rounds. A round, in order:

    1. Stop first if the privacy budget does not allow another round.
    2. Sample ``clients_per_round`` clients seeded by (seed, round) (Poisson sampling under
       DP when asked); the strategy turns them into tasks (its client-side terms); system
       heterogeneity sets their local work and drops some; the attack picks its clients.
    3. Start the round's update pipeline (:mod:`~fedtorch.server.round_pipeline`) and
       broadcast the global weights (decoded from ``compression.downlink`` if set).
    4. The engine trains the clients and hands each delta, as soon as the client
       finishes, to the pipeline: a non-finite check, the attack, compression, privacy
       and secure aggregation, then the aggregator (running sums, or rows).
    5. Check the round: failed clients are logged (or stop the run with
       ``on_client_failure=raise``); fewer than ``min_clients`` reports stop the run.
    6. Under deferred Ctrl-C: the aggregator's server step gives the new global vector;
       ``max``-rule counters take the element-wise maximum; local keys, compression
       residuals and bytes are committed (:mod:`~fedtorch.server.traffic`).
    7. With ``engine=distributed``, start the next round so the workers train while
       rank 0 evaluates.
    8. Evaluate every ``eval_every`` rounds and on the last (:class:`Evaluator`); log the
       row; checkpoint when due (:mod:`~fedtorch.server.resume`).
    9. Stop early once test accuracy reaches ``target_accuracy``, or once the bytes sent
       reach ``communication_budget_mb`` (:mod:`~fedtorch.server.traffic`).

    After the last round: a final checkpoint, ``model.pt`` (and the adapter) and
    ``summary.json`` (:mod:`~fedtorch.server.summary`); the logger is closed with the
    summary, or with ``interrupted``/``failed`` when the run stops on an exception.

    Raises:
        Interrupted: on Ctrl-C, after saving a checkpoint of the last finished round.
        FedtorchError: a client failure with ``on_client_failure=raise``, too few
            reporting clients, or a server step that gives non-finite weights.
    """

    model: nn.Module
    layout: StateLayout
    trainer: ClientTrainer
    engine: Any
    strategy: Strategy
    data: DataBundle
    shards: Sequence[torch.Tensor]
    settings: RunSettings
    logger: MetricsLogger
    run_dir: Path
    system: SystemHeterogeneity
    pipelines: RoundPipelines
    traffic: Traffic
    evaluator: Evaluator
    checkpoints: RunCheckpoints
    extra_summary: dict[str, Any] = field(default_factory=dict)
    run_lock: RunLock | None = None

    def __post_init__(self) -> None:
        self.shards, self.run_dir = list(self.shards), Path(self.run_dir)
        self.attack, self.privacy = self.pipelines.attack, self.pipelines.privacy
        self.compression, self.secure_agg = self.pipelines.compression, self.pipelines.secure_agg
        self.silos, self.folded_keys = self.evaluator.silos, self.checkpoints.folded_keys
        # Contiguous whatever the model's layout (memory_format), so model.pt, checkpoints
        # and the vectorized engine's stacked copies are plain row-major tensors.
        self.global_state = {
            k: v.detach().clone(memory_format=torch.contiguous_format)
            for k, v in self.model.state_dict().items()
        }
        self.global_vector = self.layout.flatten(self.global_state)
        # True from a round's aggregation until its evaluation is done.
        self._unfinished = False
        # The next round, started before this one's evaluation (engine=distributed).
        self._next_round: _StartedRound | None = None

    def run(self) -> dict[str, Any]:
        """Train for all rounds (or until the target); return the summary (also written)."""
        try:
            try:
                summary = self._run()
            except (Interrupted, KeyboardInterrupt):
                self.logger.close(status="interrupted")
                raise
            except BaseException:
                self.logger.close(status="failed")
                raise
            self.logger.close(summary)
            return summary
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _run(self) -> dict[str, Any]:
        s = self.settings
        progress = self._resume() if self.checkpoints.settings.resume else Progress()
        start = time.perf_counter() - progress.elapsed_s
        target_round, budget_stop = None, False
        self.logger.start()
        try:
            for round_idx in range(progress.round + 1, s.rounds + 1):
                if not self.privacy.round_allowed():
                    budget_stop = True
                    log.info(
                        "privacy budget: round %d would take epsilon past "
                        "privacy.target_epsilon=%g; stopping after round %d",
                        round_idx,
                        self.privacy.target_epsilon,
                        progress.round,
                    )
                    break
                t0 = time.perf_counter()
                started, self._next_round = self._next_round, None
                pipeline, row = self._train_round(started or self._start_round(round_idx))
                # From here to the end of the round the server state changes: Ctrl-C waits
                # until the round, its log row and its checkpoint are complete.
                with deferred_interrupt():
                    progress = self._finish_round(round_idx, pipeline, row, progress)
                    now = time.perf_counter()
                    row.update(
                        bytes_up=progress.bytes_up,
                        bytes_down=progress.bytes_down,
                        round_time_s=now - t0,
                        elapsed_s=now - start,
                    )
                    progress.elapsed_s = row["elapsed_s"]
                    self.logger.log(row)
                    if self.checkpoints.due(round_idx, s.rounds):
                        self._save_checkpoint(progress)
                spent = self.traffic.budget_reached(progress)
                if spent:
                    log.info("%s", spent)
                    self.extra_summary["communication_budget_reached"] = True
                    break
                best = progress.best_accuracy
                if s.target_accuracy is not None and best is not None and best >= s.target_accuracy:
                    target_round = progress.best_round
                    break
        except KeyboardInterrupt:
            if self._unfinished:
                # The round's aggregate is in the weights but the round did not finish (a
                # peer stopped during a distributed evaluation): those weights belong to no
                # round, so the newest checkpoint on disk is where to resume.
                raise Interrupted(progress.round, self.checkpoints.newest()) from None
            path = self._save_checkpoint(progress) if progress.round else None
            raise Interrupted(progress.round, path) from None
        if self.checkpoints.settings.every and not self.checkpoints.due(progress.round, s.rounds):
            self._save_checkpoint(progress)
        self.checkpoints.save_model(self.model, self.global_state)
        summary = run_summary(
            progress,
            s,
            wall_time_s=time.perf_counter() - start,
            round_reached_target=target_round,
            model=self.model,
            device=self.global_vector.device,
            trainer=self.trainer,
            budget_stop=budget_stop,
            parts=self.pipelines,
            extra=self.extra_summary,
        )
        write_json(self.run_dir / "summary.json", summary)
        return summary

    def _start_round(self, round_idx: int) -> _StartedRound:
        """A round's cohort, tasks and pipeline; with an engine that can, the workers are
        already sent their clients (engine.start) when this returns. Changes no server
        state."""
        s, dp = self.settings, self.privacy
        poisson, secure = dp.sampling == "poisson", dp.enabled and dp.secure
        cohort = sample_cohort(
            len(self.shards), s.clients_per_round, s.seed, round_idx, poisson, secure
        )
        tasks = self.strategy.configure(cohort, round_idx)
        sizes = self.pipelines.shard_sizes
        tasks, dropped = self.system.apply(tasks, round_idx, sizes, self.trainer.batch_size)
        self.attack.prepare(tasks)
        self.compression.start_round(round_idx)
        pipeline = self._start_pipeline(tasks, round_idx)
        sent_state, sent_vector = self.traffic.broadcast(self.global_state, self.global_vector)
        started = _StartedRound(
            round_idx, list(cohort), tasks, dropped, pipeline, sent_state, sent_vector
        )
        if tasks and hasattr(self.engine, "start"):
            self.engine.start(tasks, self.shards, sent_state, sent_vector, round_idx)
            started.dispatched = True
        return started

    def _start_pipeline(self, tasks: list[ClientTask], round_idx: int) -> UpdatePipeline:
        return self.pipelines.start(tasks, round_idx, self.global_state, self.global_vector)

    def _train_round(self, started: _StartedRound) -> tuple[UpdatePipeline | None, dict]:
        """Train (or finish training) a started round and report it as a metrics row."""
        round_idx, pipeline = started.round_idx, started.pipeline
        sent = (started.sent_state, started.sent_vector, round_idx, pipeline)
        if started.dispatched:
            self.engine.finish(self.trainer, self.shards, *sent)
        elif started.tasks:
            self.engine.run(self.trainer, started.tasks, self.shards, *sent)
        failed = self._check_failures(pipeline, round_idx)
        trained = len(pipeline.clients)
        if trained < self.settings.min_clients:
            raise FedtorchError(
                f"round {round_idx}: only {trained} of {len(started.cohort)} sampled clients "
                f"reported ({len(started.dropped)} dropped out, {failed} failed), fewer than "
                f"min_clients={self.settings.min_clients}"
            )
        row: dict[str, Any] = {"round": round_idx, "clients": trained, "sampled": started.cohort}
        if self.system.dropout:
            row["dropped"] = len(started.dropped)
        row["failed"] = failed
        if self.attack.malicious:
            row["malicious"] = sum(c.client_id in self.attack.malicious for c in pipeline.clients)
        row.update(weighted_train_metrics(pipeline.clients))
        if getattr(self.trainer, "lr_schedule", "constant") != "constant":
            row["lr"] = self.trainer.learning_rates(round_idx)[0]  # client.lr_schedule's
        return (pipeline if trained or self.privacy.enabled else None), row

    def _check_failures(self, pipeline: UpdatePipeline, round_idx: int) -> int:
        """Log each rejected client; raise if ``on_client_failure=raise``. Returns the count."""
        for failure in pipeline.failures:
            message = f"round {round_idx}: client {failure.client_id} failed: {failure.reason}"
            if self.settings.on_client_failure == "raise":
                raise FedtorchError(f"{message} (on_client_failure=raise)")
            log.warning("%s; dropped from the round", message)
        return len(pipeline.failures)

    def _finish_round(
        self, round_idx: int, pipeline: UpdatePipeline | None, row: dict, progress: Progress
    ) -> Progress:
        """Aggregate, count the bytes, evaluate; the new progress (the state-changing half)."""
        sampled = row.pop("sampled")
        self._unfinished = True
        reporting = []
        if pipeline is not None:
            self._apply(pipeline, round_idx, row)
            reporting = [c.client_id for c in pipeline.clients]
            self.trainer.commit_local_state(reporting)
            self.compression.commit()
        progress = self.traffic.count_round(progress, sampled, reporting, row)
        progress.round = round_idx
        self._start_next_round(round_idx)
        if self.settings.evaluates(round_idx):
            progress.record_eval(self._evaluate(), round_idx)
            row.update(progress.last_eval)
        self._unfinished = False
        return progress

    def _apply(self, pipeline: UpdatePipeline, round_idx: int, row: dict) -> None:
        """The aggregator's server step: the new global state."""
        aggregated = pipeline.finish()
        if isinstance(pipeline.aggregator, PrivateRound):
            row.update(pipeline.aggregator.metrics)
        if not all_finite(aggregated):
            raise FedtorchError(
                f"round {round_idx}: the {type(self.strategy).__name__} server step gave "
                "non-finite weights (NaN or Inf) from finite client updates; the run stops "
                f"with the model of round {round_idx - 1} (check the strategy's options, "
                "e.g. strategy.server_lr)"
            )
        self.global_vector = aggregated
        self.layout.unflatten_into(self.global_vector, self.global_state)
        counter_keys = self.layout.keys("max")
        if counter_keys and pipeline.clients:
            counters = [c.counters for c in pipeline.clients]
            self.global_state.update(aggregate_max(counters, counter_keys))

    def _start_next_round(self, round_idx: int) -> None:
        """Send round ``round_idx + 1``'s clients to the workers before round
        ``round_idx`` is evaluated and checkpointed on rank 0, so they train while it does
        (engine=distributed). Runs that may stop early (a target accuracy, a privacy
        budget, a communication budget) or evaluate on the workers (silos) do not start
        early."""
        if (
            not hasattr(self.engine, "start")
            or round_idx >= self.settings.rounds
            or self.settings.target_accuracy is not None
            or self.traffic.budget_mb is not None
            or self.silos is not None
            or self.privacy.enabled
            or self.secure_agg.enabled
        ):
            return
        try:
            self._next_round = self._start_round(round_idx + 1)
        except (RuntimeError, DistributedError, KeyboardInterrupt) as exc:
            # A worker is gone (or stopping with rank 0): finish this round as usual; the
            # next round's own start reports the lost rank (or the interrupt stops first).
            log.warning("distributed: round %d not started early: %s", round_idx + 1, exc)
            self._next_round = None

    def _evaluate(self) -> dict[str, float]:
        # The ranks help evaluate unless they are already training the next round.
        return self.evaluator.evaluate(self.global_state, shared=self._next_round is None)

    def _save_checkpoint(self, progress: Progress) -> Path:
        return self.checkpoints.save(
            progress,
            self.global_state,
            self.global_vector,
            self.trainer.local_state,
            self.logger.history,
        )

    def _resume(self) -> Progress:
        progress, payload = self.checkpoints.resume(self.global_state)
        self.global_vector = payload["global_vector"].to(self.global_vector.device)
        self.trainer.local_state = payload["local_state"]
        self.logger.restore(payload["history"])
        return progress


@dataclass
class _StartedRound:
    """A round sampled and configured, its clients maybe already sent to the workers."""

    round_idx: int
    cohort: list[int]
    tasks: list[ClientTask]
    dropped: list[Any]
    pipeline: UpdatePipeline
    sent_state: dict[str, torch.Tensor]
    sent_vector: torch.Tensor
    dispatched: bool = False
