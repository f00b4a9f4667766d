"""A round's update pipeline, assembled from the run's components.

    check_finite ─► attack? ─► compress and decode? ─► clip/noise and mask? ─► aggregator

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
        steps: list[Any] = [check_finite]
        if self.attack.rewrites_updates:
            steps.append(lambda client, delta: self._attack(client, delta, round_idx))
        if self.compression.enabled:  # before privacy: DP clips the decoded update
            steps.append(self.compression.step)
        if self.privacy.enabled or self.secure_agg.enabled:
            aggregator: Any = self._private(tasks, round_idx, global_vector)
            steps.append(aggregator.client_step)
        elif self.summed:
            aggregator = SummedRound(self.strategy, global_vector, round_idx)
        else:
            aggregator = self._strategy_round(len(tasks), round_idx, global_state, global_vector)
        return UpdatePipeline(steps, aggregator)

    def _attack(self, client: ClientResult, delta: torch.Tensor, round_idx: int) -> torch.Tensor:
        self.attack.rewrite(client.client_id, delta, round_idx)
        return delta

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
