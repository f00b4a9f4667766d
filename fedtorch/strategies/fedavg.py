"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data").

Update rule, with n_k the sample count of client k in the round's cohort S:

    w_{t+1} = w_t + sum_{k in S} (n_k / sum_{j in S} n_j) * (w_k - w_t)

``weighted=False`` gives every client the weight 1/|S| (the uniform average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch.results import ClientResult
from fedtorch.strategies.aggregate import weighted_average
from fedtorch.strategies.base import Strategy


class FedAvg(Strategy):
    """Sample-weighted (default) or uniform averaging of client models."""

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(
        self, global_vector: torch.Tensor, results: Sequence[ClientResult], round_idx: int
    ) -> torch.Tensor:
        deltas = self.stack_deltas(results, global_vector.device)
        if self.weighted:
            weights = torch.tensor([float(r.num_samples) for r in results])
        else:
            weights = torch.ones(len(results))
        return global_vector + weighted_average(deltas, weights.to(global_vector.device))
