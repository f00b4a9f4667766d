"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data").

Update rule, with n_k the sample count of client k in the round's cohort S:

    w_{t+1} = w_t + sum_{k in S} (n_k / sum_{j in S} n_j) * (w_k - w_t)

``weighted=False`` gives every client the weight 1/|S| (the uniform average).
"""

from __future__ import annotations

import torch

from fedtorch.results import RoundResults
from fedtorch.strategies.aggregate import weighted_average
from fedtorch.strategies.base import Strategy


class FedAvg(Strategy):
    """Sample-weighted (default) or uniform averaging of client models."""

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def average_delta(self, results: RoundResults) -> torch.Tensor:
        """The round's average client delta [P]: sample-weighted, or uniform."""
        counts = results.sample_counts()
        weights = counts if self.weighted else torch.ones_like(counts)
        return weighted_average(results.deltas, weights)

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        return global_vector + self.average_delta(results)
