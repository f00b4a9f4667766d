"""A round's update pipeline, assembled from the run's components.

    client side (:class:`RoundClientSide`, where the client trained):
        check_finite ─► attack? ─► compress and decode? ─► clip (+ local noise)?
    server:  pre-weight and mask? ─► aggregator

The aggregator is the strategy's (running sums, or rows for the rules that need them),
wrapped for exact LoRA aggregation; with privacy or secure aggregation it is the private
release (:class:`~fedtorch.privacy.release.PrivateRound`), whose server step is the
strategy's; with ``aggregation.collective=allreduce`` the ranks' summed round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedtorch.client.attacks import Attack
from fedtorch.compression import Compression
from fedtorch.engines.distributed import SummedRound
from fedtorch.pipeline.pipeline import UpdatePipeline, check_finite
from fedtorch.privacy.dp import DifferentialPrivacy, NoPrivacy
from fedtorch.privacy.release import PrivateRound
from fedtorch.privacy.secagg import SecureAggregation
from fedtorch.results import ClientResult, ClientTask
from fedtorch.state.layout import StateLayout
from fedtorch.strategies.base import Strategy
from fedtorch.strategies.lora_exact import ExactLoRARound, LoraPair
from fedtorch.strategies.rows import RowStore


class RoundPipelines:
    """Makes each round's :class:`UpdatePipeline` from the components of one run."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        layout: StateLayout,
        attack: Attack,
        compression: Compression,
        privacy: DifferentialPrivacy | NoPrivacy,
        secure_agg: SecureAggregation,
        exact_lora: list[LoraPair],
        shard_sizes: Sequence[int],
        summed: bool,
        memory_budget_mb: float,
        run_dir: Path,
    ) -> None:
        self.strategy, self.layout, self.attack = strategy, layout, attack
        self.compression, self.privacy, self.secure_agg = compression, privacy, secure_agg
        self.exact_lora, self.shard_sizes, self.summed = exact_lora, shard_sizes, summed
        self.memory_budget = int(memory_budget_mb * 2**20)
        self.rows_dir = Path(run_dir) / "aggregation"

    def start(
        self,
        tasks: list[ClientTask],
        round_idx: int,
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
    ) -> UpdatePipeline:
        """The pipeline of round ``round_idx`` whose clients are ``tasks``."""
        steps: list[Any] = []
        if self.privacy.enabled or self.secure_agg.enabled:
            aggregator: Any = self._private(tasks, round_idx, global_vector)
            steps.append(aggregator.client_step)
        elif self.summed:
            aggregator = SummedRound(self.strategy, global_vector, round_idx)
        else:
            aggregator = self._strategy_round(len(tasks), round_idx, global_state, global_vector)
        private = aggregator if isinstance(aggregator, PrivateRound) else None
        return UpdatePipeline(steps, aggregator, self.client_side(round_idx, private))

    def client_side(self, round_idx: int, private: PrivateRound | None = None) -> RoundClientSide:
        """The client's steps of round ``round_idx`` (on a worker rank: ``private`` None,
        and the compression's round started by the caller)."""
        return RoundClientSide(self.attack, self.compression, self.privacy, round_idx, private)

    def _private(
        self, tasks: list[ClientTask], round_idx: int, global_vector: torch.Tensor
    ) -> PrivateRound:
        weighted = getattr(self.strategy, "weighted", True)
        weights = {
            t.client_id: float(self.shard_sizes[t.client_id]) if weighted else 1.0 for t in tasks
        }
        return PrivateRound(
            self.privacy,
            self.secure_agg,
            weights,
            round_idx,
            global_vector,
            lambda mean: self.strategy.server_step(global_vector, mean, round_idx),
        )

    def _strategy_round(
        self,
        cohort: int,
        round_idx: int,
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
    ) -> Any:
        rows = RowStore(
            cohort,
            self.layout.size,
            self.memory_budget,
            self.rows_dir,
            global_vector.device,
            global_vector.dtype,
        )
        aggregator = self.strategy.start_round(global_vector, round_idx, rows)
        if not self.exact_lora:
            return aggregator
        return ExactLoRARound(
            aggregator,
            self.exact_lora,
            self.layout,
            global_vector,
            global_state,
            self.strategy.client_weight,
        )


class RoundClientSide:
    """The steps of one round that belong to the client, in this order: reject a non-finite
    update, the simulated attack's rewrite, compression (encode, then the decoded update
    goes on; the error-feedback residual is staged), DP clipping (and in local mode the
    client's noise). Runs where the client trained: in the one process, or on the worker
    rank under ``engine=distributed``, so rank 0 receives the clipped, noised, decoded
    update and a receipt, never the raw delta.

    The receipt (:meth:`run`) holds what the server records and cannot recompute without
    the raw delta: ``sent_bytes`` (the encoded message's size, with compression) and
    ``within_clip`` (adaptive clipping's bit, with DP); :meth:`accept` records it in the
    compression's byte counts and in ``private``'s clipped count.
    """

    def __init__(
        self,
        attack: Attack,
        compression: Compression,
        privacy: DifferentialPrivacy | NoPrivacy,
        round_idx: int,
        private: PrivateRound | None = None,
    ) -> None:
        self.attack, self.compression, self.privacy = attack, compression, privacy
        self.round_idx, self.private = round_idx, private

    def run(self, client: ClientResult, delta: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The update as the client sends it, and its receipt."""
        update = check_finite(client, delta)
        if self.attack.rewrites_updates:
            self.attack.rewrite(client.client_id, update, self.round_idx)
        receipt: dict[str, Any] = {}
        if self.compression.enabled:  # before privacy: DP clips the decoded update
            update = self.compression.step(client, update)
            receipt["sent_bytes"] = int(self.compression.sent[client.client_id])
        if self.privacy.enabled:
            within = self.privacy.privatize(update, client.client_id, self.round_idx)
            receipt["within_clip"] = bool(within)
        return update, receipt

    def accept(self, client: ClientResult, receipt: dict[str, Any]) -> None:
        """Record a client's receipt (on the server)."""
        if self.compression.enabled:
            if "sent_bytes" not in receipt:
                raise ValueError(f"client {client.client_id} without its sent_bytes")
            self.compression.sent[client.client_id] = receipt["sent_bytes"]
        if self.private is not None and self.privacy.enabled:
            if "within_clip" not in receipt:
                raise ValueError(f"client {client.client_id} without its within_clip bit")
            self.private.unclipped += bool(receipt["within_clip"])
