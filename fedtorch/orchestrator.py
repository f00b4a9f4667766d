"""The round loop: sample, train locally, aggregate, evaluate, log. Read it top to bottom."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtorch import checkpoint
from fedtorch.attacks import Attack
from fedtorch.client import ClientTrainer
from fedtorch.data.datasets import DataBundle
from fedtorch.errors import FedtorchError
from fedtorch.evaluation import evaluate, per_client_accuracy, worst_fraction_mean
from fedtorch.heterogeneity import SystemHeterogeneity
from fedtorch.metrics import MetricsLogger
from fedtorch.results import RoundResults
from fedtorch.sampling import sample_clients
from fedtorch.state import StateLayout, aggregate_max
from fedtorch.strategies.base import Strategy

log = logging.getLogger("fedtorch")


@dataclass
class RunSettings:
    """The round-loop knobs (top-level config keys)."""

    rounds: int
    clients_per_round: int
    seed: int
    eval_every: int = 1
    eval_clients: bool = False
    eval_batch_size: int = 2048
    target_accuracy: float | None = None
    on_client_failure: str = "drop"
    min_clients: int = 1


class Orchestrator:
    """Runs federated training for ``settings.rounds`` rounds.

    Each round: sample ``clients_per_round`` clients seeded by (seed, round); the strategy
    turns them into tasks (its client-side terms); system heterogeneity sets their local
    work and drops some; the engine trains the rest from the global weights; malicious
    clients (if any) rewrite their updates; the strategy aggregates the deltas into a new
    global vector; ``max``-rule counters take the element-wise maximum; the global model is
    evaluated every ``eval_every`` rounds and on the last one; a row goes to the logger. The
    loop stops early once test accuracy reaches ``target_accuracy``.

    A client that raises, sends NaN/Inf or a malformed state is dropped from the round and
    logged with its id and reason (``on_client_failure=raise`` stops instead). If fewer
    than ``min_clients`` clients report (failures and drop-outs), the run stops with a
    message; ``min_clients=0`` lets such a round leave the model unchanged.

    Outputs in ``run_dir``: ``metrics.csv``, ``metrics.jsonl``, ``metrics.png`` (via the
    logger), ``model.pt`` (final global ``state_dict``) and ``summary.json``.
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
        self.attack = attack or Attack(num_clients=len(self.shards), seed=settings.seed)
        self.shard_sizes = [len(s) for s in self.shards]
        self.extra_summary = extra_summary or {}
        self.owner = self._owner_map() if settings.eval_clients else None
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.global_vector = layout.flatten(self.global_state)
        vector_bytes = layout.size * 4
        extra_down, extra_up = strategy.extra_vectors
        self.bytes_down_per_client = (
            layout.bytes_of(self.global_state, ("mean", "max", "keep")) + extra_down * vector_bytes
        )
        self.bytes_up_per_client = (
            layout.bytes_of(self.global_state, ("mean", "max")) + extra_up * vector_bytes
        )

    def run(self) -> dict[str, Any]:
        """Train for all rounds (or until the target); return the summary (also written)."""
        s = self.settings
        start = time.perf_counter()
        best_acc, best_round, target_round, last_eval = None, None, None, {}
        bytes_up = bytes_down = 0
        round_idx = 0
        self.logger.start()
        try:
            for round_idx in range(1, s.rounds + 1):
                t0 = time.perf_counter()
                cohort = sample_clients(len(self.shards), s.clients_per_round, s.seed, round_idx)
                tasks = self.strategy.configure(cohort, round_idx)
                tasks, dropped = self.system.apply(
                    tasks, round_idx, self.shard_sizes, self.trainer.batch_size
                )
                self.attack.prepare(tasks)
                attacked, trained, failed = 0, 0, 0
                if tasks:
                    results = self.engine.run(
                        self.trainer,
                        tasks,
                        self.shards,
                        self.global_state,
                        self.global_vector,
                        round_idx,
                    )
                    failed = self._check_failures(results, round_idx)
                    attacked = self.attack.corrupt(results, round_idx)
                    trained = len(results)
                if trained < s.min_clients:
                    raise FedtorchError(
                        f"round {round_idx}: only {trained} of {len(cohort)} sampled clients "
                        f"reported ({len(dropped)} dropped out, {failed} failed), fewer than "
                        f"min_clients={s.min_clients}"
                    )
                if trained:
                    self._apply(results, round_idx)
                bytes_down += self.bytes_down_per_client * len(cohort)
                bytes_up += self.bytes_up_per_client * trained

                row: dict[str, Any] = {"round": round_idx, "clients": trained}
                if self.system.dropout:
                    row["dropped"] = len(dropped)
                row["failed"] = failed
                if self.attack.malicious:
                    row["malicious"] = attacked
                if trained:
                    row.update(_weighted_train_metrics(results))
                if round_idx % s.eval_every == 0 or round_idx == s.rounds:
                    last_eval = self._evaluate()
                    row.update(last_eval)
                    if best_acc is None or last_eval["test_accuracy"] > best_acc:
                        best_acc, best_round = last_eval["test_accuracy"], round_idx
                row.update(
                    bytes_up=bytes_up,
                    bytes_down=bytes_down,
                    round_time_s=time.perf_counter() - t0,
                    elapsed_s=time.perf_counter() - start,
                )
                self.logger.log(row)
                reached = s.target_accuracy is not None and best_acc is not None
                if reached and best_acc >= s.target_accuracy:
                    target_round = best_round
                    break
        finally:
            self.logger.close()
        checkpoint.save_state(self.global_state, self.run_dir / "model.pt")
        summary = {
            "rounds_completed": round_idx,
            "final_accuracy": last_eval.get("test_accuracy"),
            "final_loss": last_eval.get("test_loss"),
            "best_accuracy": best_acc,
            "best_round": best_round,
            "target_accuracy": s.target_accuracy,
            "round_reached_target": target_round,
            "wall_time_s": round(time.perf_counter() - start, 3),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            **self.extra_summary,
        }
        checkpoint.write_json(self.run_dir / "summary.json", summary)
        return summary

    def _check_failures(self, results: RoundResults, round_idx: int) -> int:
        """Log each rejected client; raise if ``on_client_failure=raise``. Returns the count."""
        for failure in results.failures:
            message = f"round {round_idx}: client {failure.client_id} failed: {failure.reason}"
            if self.settings.on_client_failure == "raise":
                raise FedtorchError(f"{message} (on_client_failure=raise)")
            log.warning("%s; dropped from the round", message)
        return len(results.failures)

    def _apply(self, results: RoundResults, round_idx: int) -> None:
        """Aggregate the clients' results into the global state."""
        self.global_vector = self.strategy.aggregate(self.global_vector, results, round_idx)
        self.layout.unflatten_into(self.global_vector, self.global_state)
        counter_keys = self.layout.keys("max")
        if counter_keys:
            self.global_state.update(
                aggregate_max([c.counters for c in results.clients], counter_keys)
            )

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
        loss, acc = evaluate(self.model, self.data.test_x, self.data.test_y, s.eval_batch_size)
        out = {"test_loss": loss, "test_accuracy": acc}
        if s.eval_clients:
            accs = per_client_accuracy(
                self.model,
                self.data.train_x,
                self.data.train_y,
                self.owner,
                len(self.shards),
                s.eval_batch_size,
            )
            out["client_accuracy_mean"] = float(accs.mean())
            out["client_accuracy_worst10"] = worst_fraction_mean(accs, 0.1)
        return out


def _weighted_train_metrics(results: RoundResults) -> dict[str, float]:
    """Sample-weighted mean of the clients' local training loss and accuracy."""
    total = sum(r.num_samples for r in results.clients)
    if total == 0:
        return {}
    return {
        key: sum(r.metrics[key] * r.num_samples for r in results.clients) / total
        for key in ("train_loss", "train_accuracy")
        if all(key in r.metrics for r in results.clients)
    }
