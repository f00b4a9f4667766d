"""Aggregation math as pure functions over stacked client vectors.

Shapes: ``updates`` is [K, P] (K clients, P flat parameters), ``weights`` is [K].
"""

from __future__ import annotations

import torch


def weighted_average(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k u_k / sum_k w_k, computed as one matrix-vector product. Returns [P]."""
    if updates.ndim != 2 or weights.shape != updates.shape[:1]:
        raise ValueError(
            f"updates [K,P] and weights [K] expected, got {updates.shape}, {weights.shape}"
        )
    total = weights.sum()
    if not total > 0:
        raise ValueError("aggregation weights must sum to a positive number")
    return (weights.to(updates.dtype) / total) @ updates


# Byzantine-robust rules. All are unweighted: a sample count is a claim an attacker
# controls, so it cannot be trusted to weight the vote.


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when K
    is even. Returns [P]."""
    k = updates.shape[0]
    ordered = updates.sort(dim=0).values
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


def trimmed_mean(updates: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): drop the floor(beta K) largest
    and smallest values of each coordinate, average the rest. Returns [P]."""
    k = updates.shape[0]
    cut = int(beta * k)
    if 2 * cut >= k:
        raise ValueError(f"trimming {cut} of each end leaves nothing of {k} updates")
    return updates.sort(dim=0).values[cut : k - cut].mean(dim=0)


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """[K, K] squared Euclidean distances, computed in float64 from the Gram matrix."""
    u = updates.double()
    sq = (u * u).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2 * u @ u.T).clamp_min(0)


def krum_scores(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum score of each update (Blanchard et al. 2017): the sum of squared distances to
    its K - f - 2 nearest other updates. Returns [K] (float64)."""
    k = updates.shape[0]
    neighbours = k - num_byzantine - 2
    dist = pairwise_sq_distances(updates)
    dist.fill_diagonal_(float("inf"))
    if neighbours <= 0:
        return torch.zeros(k, dtype=torch.float64, device=updates.device)
    return dist.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def multi_krum(updates: torch.Tensor, num_byzantine: int, num_selected: int) -> torch.Tensor:
    """Average of the ``num_selected`` updates with the lowest Krum scores (m = 1: Krum).

    Requires K > 2f + 2. Returns [P].
    """
    k = updates.shape[0]
    if k <= 2 * num_byzantine + 2:
        raise ValueError(f"Krum needs more than 2f + 2 = {2 * num_byzantine + 2} updates, got {k}")
    chosen = krum_scores(updates, num_byzantine).argsort()[:num_selected]
    return updates[chosen].mean(dim=0)


def bulyan(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018) on top of Krum. Requires K >= 4f + 3. Returns [P].

    1. Select theta = K - 2f updates by applying Krum repeatedly, removing each pick.
    2. Per coordinate, average the beta = theta - 2f selected values closest to the
       selected values' median.
    """
    k, f = updates.shape[0], num_byzantine
    if k < 4 * f + 3:
        raise ValueError(f"Bulyan needs at least 4f + 3 = {4 * f + 3} updates, got {k}")
    theta, beta = k - 2 * f, k - 4 * f
    remaining = list(range(k))
    selected = []
    for _ in range(theta):
        scores = krum_scores(updates[remaining], f)
        selected.append(remaining.pop(int(scores.argmin())))
    chosen = updates[selected]
    median = coordinate_median(chosen)
    closest = (chosen - median).abs().topk(beta, dim=0, largest=False).indices
    return chosen.gather(0, closest).mean(dim=0)
