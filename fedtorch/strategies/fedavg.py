"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data").

Update rule, with n_k the sample count of client k in the round's cohort S:

    w_{t+1} = w_t + sum_{k in S} (n_k / sum_{j in S} n_j) * (w_k - w_t)

``weighted=False`` gives every client the weight 1/|S| (the uniform average).
"""

from __future__ import annotations

import torch

from fedtorch.results import ClientResult
from fedtorch.strategies.base import Strategy
from fedtorch.strategies.rows import RowStore
from fedtorch.strategies.streaming import RunningMean


class FedAvg(Strategy):
    """Sample-weighted (default) or uniform averaging of client models.

    Streams: the round keeps one running sum [P]. Subclasses that step on the average
    delta (FedAvgM, FedAdam, ...) override :meth:`server_step`; privacy and secure
    aggregation release only that average and call :meth:`server_step` on it.
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def client_weight(self, client: ClientResult) -> float:
        """The client's weight in the average: its sample count, or 1."""
        return float(client.num_samples) if self.weighted else 1.0

    def server_step(
        self, global_vector: torch.Tensor, mean_delta: torch.Tensor, round_idx: int
    ) -> torch.Tensor:
        """The new global vector from the round's average delta (may reuse its storage)."""
        return mean_delta.add_(global_vector)

    def start_round(
        self, global_vector: torch.Tensor, round_idx: int, rows: RowStore
    ) -> MeanAggregator:
        return MeanAggregator(self, global_vector, round_idx)


class MeanAggregator:
    """A FedAvg-family round: the running weighted mean of the deltas, then the server step.

    Subclasses add their own running sums (SCAFFOLD's control variates, FedDyn's state).
    """

    def __init__(self, strategy: FedAvg, global_vector: torch.Tensor, round_idx: int) -> None:
        self.strategy, self.global_vector, self.round_idx = strategy, global_vector, round_idx
        self.mean = RunningMean()

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        self.mean.add(delta, self.strategy.client_weight(client))

    def finish(self) -> torch.Tensor:
        return self.strategy.server_step(self.global_vector, self.mean.mean(), self.round_idx)
