"""The round loop: sample, train locally, aggregate, evaluate, log. Read it top to bottom."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtorch import checkpoint
from fedtorch.adapters import NoAdapter
from fedtorch.attacks import Attack
from fedtorch.checkpoint import CheckpointSettings, Interrupted, deferred_interrupt
from fedtorch.client import ClientTrainer
from fedtorch.compression import Compression
from fedtorch.compression.bits import packed_bytes
from fedtorch.data.datasets import DataBundle
from fedtorch.distributed import DistributedError
from fedtorch.engines.distributed import SummedRound
from fedtorch.errors import ConfigError, DataError, FedtorchError
from fedtorch.evaluation import (
    add_in_order,
    batch_totals,
    evaluate,
    evaluation_totals,
    num_batches,
    per_client_accuracy,
    worst_fraction_mean,
)
from fedtorch.heterogeneity import SystemHeterogeneity
from fedtorch.lora_exact import ExactLoRARound, LoraPair
from fedtorch.metrics import MetricsLogger
from fedtorch.pipeline.pipeline import UpdatePipeline, all_finite, check_finite
from fedtorch.pipeline.rows import RowStore
from fedtorch.privacy.dp import DifferentialPrivacy, NoPrivacy
from fedtorch.privacy.release import PrivateRound
from fedtorch.privacy.secagg import SecureAggregation
from fedtorch.results import ClientFailure, ClientResult, ClientTask
from fedtorch.sampling import sample_clients, sample_poisson
from fedtorch.silos import Silos
from fedtorch.state import StateLayout, aggregate_max
from fedtorch.strategies.base import Strategy

log = logging.getLogger("fedtorch")


@dataclass
class Progress:
    """The round loop's running totals; saved in every checkpoint."""

    round: int = 0
    best_accuracy: float | None = None
    best_round: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    # What the same messages would have taken uncompressed (float32 updates and weights).
    bytes_up_uncompressed: int = 0
    bytes_down_uncompressed: int = 0
    # Clients that have received the frozen (``keep``) weights, sent once per client.
    base_sent: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class RunSettings:
    """The round-loop knobs (top-level config keys)."""

    rounds: int
    clients_per_round: int
    seed: int
    eval_every: int = 1
    eval_clients: bool = False
    eval_local: bool = False
    eval_batch_size: int = 2048
    target_accuracy: float | None = None
    on_client_failure: str = "drop"
    min_clients: int = 1
    aggregation_memory_budget_mb: float = 1024


class Orchestrator:
    """Runs federated training for ``settings.rounds`` rounds.

    Each round: sample ``clients_per_round`` clients seeded by (seed, round); the strategy
    turns them into tasks (its client-side terms); system heterogeneity sets their local
    work and drops some; the engine trains the rest from the global weights and hands each
    client's delta, as soon as the client finishes, to the round's update pipeline
    (:mod:`fedtorch.pipeline.pipeline`): a non-finite check, the attack (malicious clients
    rewrite their updates), privacy and secure aggregation, then the strategy's aggregator,
    which keeps running sums (or rows, for rules that need them). Once all clients are
    done, the aggregator's server step gives the new global vector; ``max``-rule counters
    take the element-wise maximum; the global model is evaluated every ``eval_every``
    rounds and on the last one; a row goes to the logger. The loop stops early once test
    accuracy reaches ``target_accuracy``.

    A client that raises, sends NaN/Inf or a malformed state is dropped from the round and
    logged with its id and reason (``on_client_failure=raise`` stops instead). If fewer
    than ``min_clients`` clients report (failures and drop-outs), the run stops with a
    message; ``min_clients=0`` lets such a round leave the model unchanged.

    With privacy or secure aggregation on, the updates are clipped, noised and/or summed
    under masks and the strategy steps on the released mean (see
    :mod:`fedtorch.privacy.release`); the privacy budget can end the run early.

    Outputs in ``run_dir``: ``metrics.csv``, ``metrics.jsonl``, ``metrics.png`` (via the
    logger), ``checkpoints/`` (see :meth:`_save_checkpoint`), ``model.pt`` (final global
    ``state_dict``) and ``summary.json``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        layout: StateLayout,
        trainer: ClientTrainer,
        engine: Any,
        strategy: Strategy,
        data: DataBundle,
        shards: Sequence[torch.Tensor],
        settings: RunSettings,
        logger: MetricsLogger,
        run_dir: Path,
        system: SystemHeterogeneity | None = None,
        attack: Attack | None = None,
        checkpointing: CheckpointSettings | None = None,
        privacy: DifferentialPrivacy | NoPrivacy | None = None,
        secure_agg: SecureAggregation | None = None,
        compression: Compression | None = None,
        adapter: Any = None,
        exact_lora: list[LoraPair] | None = None,
        silos: Silos | None = None,
        extra_summary: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.trainer = trainer
        self.engine = engine
        self.strategy = strategy
        self.data = data
        self.shards = list(shards)
        self.settings = settings
        self.logger = logger
        self.run_dir = Path(run_dir)
        self.system = system or SystemHeterogeneity(seed=settings.seed)
        self.checkpointing = checkpointing or CheckpointSettings()
        self.privacy = privacy or NoPrivacy()
        self.secure_agg = secure_agg or SecureAggregation()
        self.compression = compression or Compression()
        self.adapter = adapter or NoAdapter()
        self.exact_lora = exact_lora or []
        self.silos = silos
        # True from a round's aggregation until its evaluation is done.
        self._unfinished = False
        # The next round, started before this one's evaluation (engine=distributed).
        self._next_round: _StartedRound | None = None
        # Base weights the exact LoRA aggregation changes every round (sent every round).
        self.folded_keys = {p.base for p in self.exact_lora}
        self._round_metrics: dict[str, Any] = {}
        self.attack = attack or Attack(num_clients=len(self.shards), seed=settings.seed)
        self.shard_sizes = [len(s) for s in self.shards]
        self.extra_summary = extra_summary or {}
        self.owner = self._owner_map() if settings.eval_clients else None
        # Contiguous whatever the model's layout (memory_format), so model.pt, checkpoints
        # and the vectorized engine's stacked copies are plain row-major tensors.
        self.global_state = {
            k: v.detach().clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items()
        }
        self.global_vector = layout.flatten(self.global_state)
        vector_bytes = layout.size * 4
        extra_down, extra_up = strategy.extra_vectors
        folded_bytes = sum(
            self.global_state[k].numel() * self.global_state[k].element_size()
            for k in self.folded_keys
        )
        self.bytes_down_per_client = (
            layout.bytes_of(self.global_state, ("mean", "max"))
            + extra_down * vector_bytes
            + folded_bytes
        )
        # Frozen (keep) weights never change, so each client downloads them once.
        self.bytes_down_once = layout.bytes_of(self.global_state, ("keep",)) - folded_bytes
        self.bytes_up_per_client = (
            layout.bytes_of(self.global_state, ("mean", "max")) + extra_up * vector_bytes
        )
        # The parts of a message that compression leaves alone: counters (max keys) and a
        # strategy's extra vectors (SCAFFOLD's control variates) up; all but the mean keys
        # down.
        mean_bytes = layout.bytes_of(self.global_state, ("mean",))
        self.bytes_up_other = self.bytes_up_per_client - mean_bytes
        self.bytes_down_other = self.bytes_down_per_client - mean_bytes
        self._round_down_per_client = self.bytes_down_per_client

    def run(self) -> dict[str, Any]:
        """Train for all rounds (or until the target); return the summary (also written).

        The logger is closed last, with the summary after a finished run (its trackers
        then record it and upload ``model.pt``, ``metrics.png``, ...), or with the status
        ``interrupted`` or ``failed`` when the run stops on an exception.

        Raises:
            Interrupted: on Ctrl-C, after saving a checkpoint of the last finished round.
        """
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

    def _run(self) -> dict[str, Any]:
        s = self.settings
        progress = self._resume() if self.checkpointing.resume else Progress()
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
                pipeline, row = self._train_round(round_idx)
                # From here to the end of the round the server state changes: Ctrl-C waits
                # until the round, its log row and its checkpoint are complete.
                with deferred_interrupt():
                    progress = self._finish_round(round_idx, pipeline, row, progress)
                    row.update(
                        bytes_up=progress.bytes_up,
                        bytes_down=progress.bytes_down,
                        round_time_s=time.perf_counter() - t0,
                        elapsed_s=time.perf_counter() - start,
                    )
                    progress.elapsed_s = row["elapsed_s"]
                    self.logger.log(row)
                    if self._checkpoint_due(round_idx):
                        self._save_checkpoint(progress)
                best = progress.best_accuracy
                if s.target_accuracy is not None and best is not None and best >= s.target_accuracy:
                    target_round = progress.best_round
                    break
        except KeyboardInterrupt:
            if self._unfinished:
                # The round's aggregate is in the weights but the round did not finish (a
                # peer stopped during a distributed evaluation): those weights belong to no
                # round, so the newest checkpoint on disk is where to resume.
                found = checkpoint.list_checkpoints(self.run_dir)
                raise Interrupted(progress.round, found[0] if found else None) from None
            path = self._save_checkpoint(progress) if progress.round else None
            raise Interrupted(progress.round, path) from None
        if self.checkpointing.every and not self._checkpoint_due(progress.round):
            self._save_checkpoint(progress)
        self._save_model()
        last_eval = progress.last_eval
        summary = {
            "rounds_completed": progress.round,
            "final_accuracy": last_eval.get("test_accuracy"),
            "final_loss": last_eval.get("test_loss"),
            "best_accuracy": progress.best_accuracy,
            "best_round": progress.best_round,
            "target_accuracy": s.target_accuracy,
            "round_reached_target": target_round,
            "wall_time_s": round(time.perf_counter() - start, 3),
            "bytes_up": progress.bytes_up,
            "bytes_down": progress.bytes_down,
            **self._compression_summary(progress),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": sum(
                p.numel() for p in self.model.parameters() if p.requires_grad
            ),
            **_peak_memory(self.global_vector.device),
            **self._privacy_summary(budget_stop),
            **self.extra_summary,
        }
        checkpoint.write_json(self.run_dir / "summary.json", summary)
        return summary

    def _train_round(self, round_idx: int) -> tuple[UpdatePipeline | None, dict[str, Any]]:
        """Sample, configure and train one round's clients, their updates streaming into
        the round's pipeline; changes no server state. A round the distributed engine
        started early (:meth:`_start_next_round`) is finished here."""
        started, self._next_round = self._next_round, None
        return self._complete_round(started or self._start_round(round_idx))

    def _start_round(self, round_idx: int) -> _StartedRound:
        """A round's cohort, tasks and pipeline; with an engine that can, the workers are
        already sent their clients (engine.start) when this returns."""
        s = self.settings
        if self.privacy.sampling == "poisson":
            rate = s.clients_per_round / len(self.shards)
            cohort = sample_poisson(len(self.shards), rate, s.seed, round_idx)
        else:
            cohort = sample_clients(len(self.shards), s.clients_per_round, s.seed, round_idx)
        tasks = self.strategy.configure(cohort, round_idx)
        tasks, dropped = self.system.apply(
            tasks, round_idx, self.shard_sizes, self.trainer.batch_size
        )
        self.attack.prepare(tasks)
        self.compression.start_round(round_idx)
        pipeline = self._start_pipeline(tasks, round_idx)
        sent_state, sent_vector = self._broadcast()
        started = _StartedRound(
            round_idx, list(cohort), tasks, dropped, pipeline, sent_state, sent_vector
        )
        if tasks and hasattr(self.engine, "start"):
            self.engine.start(tasks, self.shards, sent_state, sent_vector, round_idx)
            started.dispatched = True
        return started

    def _start_next_round(self, round_idx: int) -> None:
        """Send round ``round_idx + 1``'s clients to the workers before round
        ``round_idx`` is evaluated and checkpointed on rank 0, so they train while it does
        (engine=distributed). Starting a round changes no server state; runs that may stop
        early (a target accuracy, a privacy budget) or evaluate on the workers (silos) do
        not start early."""
        s = self.settings
        if (
            not hasattr(self.engine, "start")
            or round_idx >= s.rounds
            or s.target_accuracy is not None
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

    def _complete_round(
        self, started: _StartedRound
    ) -> tuple[UpdatePipeline | None, dict[str, Any]]:
        """Train (or finish training) a started round and report it as a metrics row."""
        s = self.settings
        round_idx, cohort, tasks = started.round_idx, started.cohort, started.tasks
        dropped, pipeline = started.dropped, started.pipeline
        sent_state, sent_vector = started.sent_state, started.sent_vector
        if started.dispatched:
            self.engine.finish(
                self.trainer, self.shards, sent_state, sent_vector, round_idx, pipeline
            )
        elif tasks:
            self.engine.run(
                self.trainer, tasks, self.shards, sent_state, sent_vector, round_idx, pipeline
            )
        failed = self._check_failures(pipeline.failures, round_idx)
        clients = pipeline.clients
        trained = len(clients)
        if trained < s.min_clients:
            raise FedtorchError(
                f"round {round_idx}: only {trained} of {len(cohort)} sampled clients "
                f"reported ({len(dropped)} dropped out, {failed} failed), fewer than "
                f"min_clients={s.min_clients}"
            )
        row: dict[str, Any] = {"round": round_idx, "clients": trained, "sampled": list(cohort)}
        if self.system.dropout:
            row["dropped"] = len(dropped)
        row["failed"] = failed
        if self.attack.malicious:
            row["malicious"] = sum(c.client_id in self.attack.malicious for c in clients)
        if trained:
            row.update(_weighted_train_metrics(clients))
        return (pipeline if trained or self.privacy.enabled else None), row

    def _broadcast(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The global weights as clients receive them: the server's own, or, with
        ``compression.downlink``, a decoded copy of the compressed mean keys (clients train
        from it and their deltas are taken against it). Sets this round's download bytes."""
        if self.compression.downlink == "none":
            return self.global_state, self.global_vector
        vector, nbytes = self.compression.broadcast(self.global_vector)
        self._round_down_per_client = nbytes + self.bytes_down_other
        state = dict(self.global_state)
        for spec in self.layout.specs:
            state[spec.name] = state[spec.name].clone()
        self.layout.unflatten_into(vector, state)
        return state, vector

    def _start_pipeline(self, tasks: list[ClientTask], round_idx: int) -> UpdatePipeline:
        """The round's update pipeline: the per-update steps, then the aggregator."""
        steps: list[Any] = [check_finite]
        if self.attack.rewrites_updates:
            steps.append(lambda client, delta: self._attack(client, delta, round_idx))
        if self.compression.enabled:  # before privacy: DP clips the decoded update
            steps.append(self.compression.step)
        if self.privacy.enabled or self.secure_agg.enabled:
            weighted = getattr(self.strategy, "weighted", True)
            weights = {
                t.client_id: float(self.shard_sizes[t.client_id]) if weighted else 1.0
                for t in tasks
            }
            aggregator = PrivateRound(
                self.privacy,
                self.secure_agg,
                weights,
                round_idx,
                self.global_vector,
                lambda mean: self.strategy.server_step(self.global_vector, mean, round_idx),
            )
            steps.append(aggregator.client_step)
        elif getattr(self.engine, "collective", "gather") == "allreduce":
            aggregator = SummedRound(self.strategy, self.global_vector, round_idx)
        else:
            rows = RowStore(
                len(tasks),
                self.layout.size,
                int(self.settings.aggregation_memory_budget_mb * 2**20),
                self.run_dir / "aggregation",
                self.global_vector.device,
                self.global_vector.dtype,
            )
            aggregator = self.strategy.start_round(self.global_vector, round_idx, rows)
            if self.exact_lora:
                aggregator = ExactLoRARound(
                    aggregator,
                    self.exact_lora,
                    self.layout,
                    self.global_vector,
                    self.global_state,
                    self.strategy.client_weight,
                )
        return UpdatePipeline(steps, aggregator)

    def _attack(self, client: ClientResult, delta: torch.Tensor, round_idx: int) -> torch.Tensor:
        self.attack.rewrite(client.client_id, delta, round_idx)
        return delta

    def _finish_round(
        self,
        round_idx: int,
        pipeline: UpdatePipeline | None,
        row: dict[str, Any],
        progress: Progress,
    ) -> Progress:
        """Aggregate, evaluate and return the new progress (the state-changing half)."""
        s = self.settings
        sampled = row.pop("sampled")
        self._round_metrics = row
        self._unfinished = True
        if pipeline is not None:
            self._apply(pipeline, round_idx)
            self.trainer.commit_local_state([c.client_id for c in pipeline.clients])
            self.compression.commit()
        base_sent = progress.base_sent
        if self.bytes_down_once:
            base_sent = sorted(set(base_sent) | set(sampled))
        once = self.bytes_down_once * (len(base_sent) - len(progress.base_sent))
        up_raw = self.bytes_up_per_client * row["clients"]
        up = self._uplink_bytes(pipeline, row["clients"])
        down_raw = self.bytes_down_per_client * len(sampled)
        down = self._round_down_per_client * len(sampled)
        if self.compression.enabled or self.compression.downlink != "none":
            row["compression_ratio"] = up_raw / up if up else None
        if self.compression.downlink != "none":
            row["compression_ratio_down"] = down_raw / down if down else None
        progress = replace(
            progress,
            round=round_idx,
            bytes_down=progress.bytes_down + down + once,
            bytes_up=progress.bytes_up + up,
            bytes_down_uncompressed=progress.bytes_down_uncompressed + down_raw + once,
            bytes_up_uncompressed=progress.bytes_up_uncompressed + up_raw,
            base_sent=base_sent,
        )
        self._start_next_round(round_idx)
        if round_idx % s.eval_every == 0 or round_idx == s.rounds:
            progress.last_eval = self._evaluate()
            row.update(progress.last_eval)
            accuracy = progress.last_eval["test_accuracy"]
            if progress.best_accuracy is None or accuracy > progress.best_accuracy:
                progress.best_accuracy, progress.best_round = accuracy, round_idx
        self._unfinished = False
        return progress

    def _uplink_bytes(self, pipeline: UpdatePipeline | None, clients: int) -> int:
        """The bytes this round's reporting clients sent: their encoded updates (with
        compression), the masked ring elements (secure aggregation), or the updates as
        they are; plus what compression leaves alone (counters, extra vectors)."""
        if self.compression.enabled and pipeline is not None:
            ids = [c.client_id for c in pipeline.clients]
            return self.compression.uplink_bytes(ids) + self.bytes_up_other * len(ids)
        if self.secure_agg.enabled:
            return (
                packed_bytes(self.layout.size, self.secure_agg.bits) + self.bytes_up_other
            ) * clients
        return self.bytes_up_per_client * clients

    def _privacy_summary(self, budget_stop: bool) -> dict[str, Any]:
        accountants = getattr(self.trainer, "accountants", None)
        if accountants:  # client=dpsgd
            delta = self.trainer.delta
            return {
                "client_epsilon_max": max(a.epsilon(delta) for a in accountants.values()),
                "client_delta": delta,
            }
        if not self.privacy.enabled:
            return {}
        p = self.privacy
        return {
            "epsilon": p.accountant.epsilon(p.delta),
            "delta": p.delta,
            "noise_multiplier": p.noise_multiplier,
            "privacy_mode": p.mode,
            "client_sampling": p.sampling,
            "stopped_by_privacy_budget": budget_stop,
        }

    def _compression_summary(self, progress: Progress) -> dict[str, Any]:
        c = self.compression
        if not c.enabled and c.downlink == "none" and not self.secure_agg.enabled:
            return {}
        return {
            "compression": c.kind,
            "error_feedback": c.error_feedback,
            "downlink_compression": c.downlink,
            "bytes_up_uncompressed": progress.bytes_up_uncompressed,
            "bytes_down_uncompressed": progress.bytes_down_uncompressed,
            "compression_ratio": (
                progress.bytes_up_uncompressed / progress.bytes_up if progress.bytes_up else None
            ),
        }

    def _save_model(self) -> None:
        """``model.pt``: the final global ``state_dict`` (with an adapter, the base model
        with the adapter merged in), and the adapter in peft's format under ``adapter/``
        (with ``aggregation=exact``, also the folded base it applies to, ``base_model.pt``)."""
        if not self.adapter.enabled:
            checkpoint.save_state(self.global_state, self.run_dir / "model.pt")
            return
        self.model.load_state_dict(self.global_state)
        self.adapter.save(self.model, self.run_dir / "adapter")
        if self.folded_keys:  # the adapter applies to the folded base, not the initial one
            base = self.adapter.unloaded(self.model).state_dict()
            checkpoint.save_state(base, self.run_dir / "adapter" / "base_model.pt")
        merged = self.adapter.merged(self.model).state_dict()
        checkpoint.save_state(merged, self.run_dir / "model.pt")

    def _checkpoint_due(self, round_idx: int) -> bool:
        every = self.checkpointing.every
        return bool(every) and (round_idx % every == 0 or round_idx == self.settings.rounds)

    def _save_checkpoint(self, progress: Progress) -> Path:
        """Write everything the next round depends on (see :mod:`fedtorch.checkpoint`)."""
        payload = {
            "format": checkpoint.FORMAT,
            "round": progress.round,
            "config": self.checkpointing.config,
            # Frozen (keep) weights never change and are rebuilt identically: left out
            # (but for the base weights the exact LoRA aggregation folds into).
            "global_state": {
                k: v.detach().cpu()
                for k, v in self.global_state.items()
                if self.layout.rules[k] != "keep" or k in self.folded_keys
            },
            "global_vector": self.global_vector.detach().cpu(),
            "strategy": self.strategy.state_dict(),
            "privacy": self.privacy.state_dict(),
            "compression": self.compression.state_dict(),
            "local_state": self.trainer.local_state,
            "trainer": self.trainer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "progress": asdict(progress),
            "history": self.logger.history,
        }
        return checkpoint.save_checkpoint(
            self.run_dir, progress.round, payload, self.checkpointing.keep
        )

    def _resume(self) -> Progress:
        """Load the newest readable checkpoint (or the one named) and restore the run."""
        c = self.checkpointing
        candidates = [c.resume_from] if c.resume_from else checkpoint.list_checkpoints(self.run_dir)
        if not candidates:
            raise ConfigError(
                "resume",
                f"no checkpoint in {self.run_dir / checkpoint.CHECKPOINT_DIR}; "
                "pass resume=RUN_FOLDER of a run that wrote checkpoints (checkpoint.every > 0)",
            )
        payload, path = None, None
        for path in candidates:
            try:
                payload = checkpoint.load_checkpoint(path)
                break
            except ValueError as exc:
                if c.resume_from:
                    raise DataError(f"{path}: unusable checkpoint: {exc}") from exc
                log.warning("%s: unusable checkpoint (%s); trying the previous one", path, exc)
        if payload is None:
            raise DataError(f"no usable checkpoint in {self.run_dir / checkpoint.CHECKPOINT_DIR}")
        differences = checkpoint.config_differences(payload["config"], c.config)
        if differences and not c.force:
            shown = ", ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
            raise ConfigError(
                "resume",
                f"{path} was written with a different config: {shown}; "
                "set resume_force=true to resume anyway",
            )
        for key, value in payload["global_state"].items():
            self.global_state[key].copy_(value)
        self.global_vector = payload["global_vector"].to(self.global_vector.device)
        self.strategy.load_state_dict(payload["strategy"])
        self.privacy.load_state_dict(payload["privacy"])
        self.compression.load_state_dict(payload.get("compression", {}))
        self.trainer.local_state = payload["local_state"]
        self.trainer.load_state_dict(payload["trainer"])
        torch.set_rng_state(payload["rng"]["torch"])
        self.logger.restore(payload["history"])
        log.info("resuming after round %d from %s", payload["round"], path)
        return Progress(**payload["progress"])

    def _check_failures(self, failures: list[ClientFailure], round_idx: int) -> int:
        """Log each rejected client; raise if ``on_client_failure=raise``. Returns the count."""
        for failure in failures:
            message = f"round {round_idx}: client {failure.client_id} failed: {failure.reason}"
            if self.settings.on_client_failure == "raise":
                raise FedtorchError(f"{message} (on_client_failure=raise)")
            log.warning("%s; dropped from the round", message)
        return len(failures)

    def _apply(self, pipeline: UpdatePipeline, round_idx: int) -> None:
        """The aggregator's server step: the new global state."""
        aggregated = pipeline.finish()
        if isinstance(pipeline.aggregator, PrivateRound):
            self._round_metrics.update(pipeline.aggregator.metrics)
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
            self.global_state.update(
                aggregate_max([c.counters for c in pipeline.clients], counter_keys)
            )

    def _evaluate_local(self) -> dict[str, float]:
        """Every client's own model (the global one with its ``local`` keys) on its own test
        rows, pooled over all clients' test data (``eval_local``). A client that never
        trained uses the global model."""
        s, data = self.settings, self.data
        totals = torch.zeros(4, dtype=torch.float64, device=data.test_x.device)
        for client, rows in enumerate(data.test_client_indices or []):
            if len(rows) == 0:
                continue
            self.model.load_state_dict(self.global_state)
            own = self.trainer.local_state.get(client)
            if own is not None:
                self.model.load_state_dict(own, strict=False)
            totals += evaluation_totals(
                self.model, data.test_x, data.test_y, s.eval_batch_size, data.task, rows
            )
        self.model.load_state_dict(self.global_state)
        return _pooled(totals, "local_test")

    def silo_totals_here(self) -> dict[int, torch.Tensor]:
        """Evaluation totals of the model as loaded on each silo held by this process."""
        data = self.data
        return {
            silo: evaluation_totals(
                self.model, data.test_x, data.test_y, self.settings.eval_batch_size, data.task, rows
            ).cpu()
            for silo, rows in self.silos.test_rows.items()
        }

    def test_batch_totals(self, batches: list[int]) -> torch.Tensor:
        """Per-batch evaluation terms of the model as loaded on test batches ``batches``."""
        data = self.data
        return batch_totals(
            self.model, data.test_x, data.test_y, self.settings.eval_batch_size, data.task, batches
        )

    def _shared_totals(self) -> torch.Tensor:
        """engine=distributed: the test batches are evaluated by every rank, and the
        per-batch terms added in batch order (the one-process totals, bit for bit)."""
        count = num_batches(len(self.data.test_y), self.settings.eval_batch_size)
        return add_in_order(
            self.engine.evaluate_shared(self.global_state, count, self.test_batch_totals)
        )

    def _silo_totals(self) -> torch.Tensor:
        """Federated evaluation: every silo's totals on its own test split (the other
        processes' too, under engine=distributed), added in silo order."""
        if hasattr(self.engine, "evaluate_silos"):
            per_silo = self.engine.evaluate_silos(self.global_state, self.silo_totals_here)
        else:
            per_silo = self.silo_totals_here()
        return add_in_order(per_silo[silo] for silo in sorted(per_silo))

    def _owner_map(self) -> torch.Tensor:
        """owner[i] = client holding training sample i, -1 if none (for per-client eval)."""
        y = self.data.train_y
        owner = torch.full((len(y),), -1, dtype=torch.long, device=y.device)
        for cid, shard in enumerate(self.shards):
            owner[shard.to(y.device)] = cid
        return owner

    def _evaluate(self) -> dict[str, float]:
        """Test loss/accuracy of the global model (and per-client accuracy if asked)."""
        s = self.settings
        self.model.load_state_dict(self.global_state)
        task = self.data.task
        if self.silos is not None:
            test = _pooled(self._silo_totals(), "test")
            loss, acc = test["test_loss"], test["test_accuracy"]
        elif hasattr(self.engine, "evaluate_shared") and self._next_round is None:
            test = _pooled(self._shared_totals(), "test")
            loss, acc = test["test_loss"], test["test_accuracy"]
        else:
            loss, acc = evaluate(
                self.model, self.data.test_x, self.data.test_y, s.eval_batch_size, task
            )
        out = {"test_loss": loss, "test_accuracy": acc, **task.extra_metrics(loss)}
        if s.eval_local:
            out.update(self._evaluate_local())
        if s.eval_clients:
            accs = per_client_accuracy(
                self.model,
                self.data.train_x,
                self.data.train_y,
                self.owner,
                len(self.shards),
                s.eval_batch_size,
                task,
            )
            out["client_accuracy_mean"] = float(accs.mean())
            out["client_accuracy_worst10"] = worst_fraction_mean(accs, 0.1)
        return out


def _peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA memory allocated by PyTorch), MiB.

    After a resume these are the peaks of the resumed process, not of the whole run.
    """
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


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


def _pooled(totals: torch.Tensor, prefix: str) -> dict[str, float]:
    loss, count, correct, predicted = totals.tolist()
    return {
        f"{prefix}_loss": loss / max(count, 1.0),
        f"{prefix}_accuracy": correct / max(predicted, 1.0),
    }


def _weighted_train_metrics(clients: list[ClientResult]) -> dict[str, float]:
    """Sample-weighted mean of the clients' local training loss and accuracy."""
    total = sum(r.num_samples for r in clients)
    if total == 0:
        return {}
    out = {
        key: sum(r.metrics[key] * r.num_samples for r in clients) / total
        for key in ("train_loss", "train_accuracy")
        if all(key in r.metrics for r in clients)
    }
    epsilons = [r.metrics["epsilon"] for r in clients if "epsilon" in r.metrics]
    if epsilons:  # client=dpsgd: each client's sample-level epsilon so far
        out["client_epsilon_max"] = max(epsilons)
    return out
