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
    return distances_from_gram(u @ u.T, (u * u).sum(dim=1))


def distances_from_gram(gram: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """[K, K] squared distances ||u_i||^2 + ||u_j||^2 - 2 <u_i, u_j>, floored at 0."""
    return (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min(0)


def krum_scores(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum score of each update (Blanchard et al. 2017). Returns [K] (float64)."""
    return krum_scores_from_distances(pairwise_sq_distances(updates), num_byzantine)


def krum_scores_from_distances(distances: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum scores from the [K, K] squared distances: the sum of each update's squared
    distances to its K - f - 2 nearest other updates.

    Krum itself needs K > 2f + 2, so K - f - 2 >= 1. Bulyan's later picks run Krum on
    fewer updates, down to 2f + 1, where K - f - 2 can reach 0; a score over no neighbours
    would be 0 for every update and the pick would fall to whichever update comes first in
    the cohort. There the nearest neighbour is used (max(1, K - f - 2) neighbours), so the
    pick still prefers updates that sit close to another one. (Equal scores go to the
    lower index, as ``argmin``/``argsort`` break ties.)
    """
    k = distances.shape[0]
    if k < 2:
        return torch.zeros(k, dtype=torch.float64, device=distances.device)
    neighbours = max(1, k - num_byzantine - 2)
    dist = distances.clone().fill_diagonal_(float("inf"))
    return dist.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def check_krum(k: int, num_byzantine: int) -> None:
    """ValueError unless Krum's bound K > 2f + 2 holds."""
    if k <= 2 * num_byzantine + 2:
        raise ValueError(f"Krum needs more than 2f + 2 = {2 * num_byzantine + 2} updates, got {k}")


def multi_krum_select(distances: torch.Tensor, num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` updates with the lowest Krum scores."""
    scores = krum_scores_from_distances(distances, num_byzantine)
    return scores.argsort()[:num_selected].tolist()


def multi_krum(updates: torch.Tensor, num_byzantine: int, num_selected: int) -> torch.Tensor:
    """Average of the ``num_selected`` updates with the lowest Krum scores (m = 1: Krum).

    Requires K > 2f + 2. Returns [P].
    """
    check_krum(updates.shape[0], num_byzantine)
    chosen = multi_krum_select(pairwise_sq_distances(updates), num_byzantine, num_selected)
    return updates[chosen].mean(dim=0)


def check_bulyan(k: int, num_byzantine: int) -> None:
    """ValueError unless Bulyan's bound K >= 4f + 3 holds."""
    if k < 4 * num_byzantine + 3:
        raise ValueError(f"Bulyan needs at least 4f + 3 = {4 * num_byzantine + 3} updates, got {k}")


def bulyan_select(distances: torch.Tensor, num_byzantine: int) -> list[int]:
    """Bulyan's step 1: theta = K - 2f picks by Krum, each pick removed before the next.

    Krum runs on the remaining updates' distances (a sub-matrix of ``distances``).
    Returns the picked indices in pick order.
    """
    k = distances.shape[0]
    remaining, selected = list(range(k)), []
    for _ in range(k - 2 * num_byzantine):
        sub = distances[remaining][:, remaining]
        scores = krum_scores_from_distances(sub, num_byzantine)
        selected.append(remaining.pop(int(scores.argmin())))
    return selected


def bulyan_coordinates(chosen: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Bulyan's step 2 on the theta selected updates [theta, P]: per coordinate, the mean
    of the beta = theta - 2f values closest to the coordinate's median. Returns [P]."""
    beta = chosen.shape[0] - 2 * num_byzantine
    median = coordinate_median(chosen)
    closest = (chosen - median).abs().topk(beta, dim=0, largest=False).indices
    return chosen.gather(0, closest).mean(dim=0)


def bulyan(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018) on top of Krum. Requires K >= 4f + 3. Returns [P].

    1. Select theta = K - 2f updates by applying Krum repeatedly, removing each pick.
    2. Per coordinate, average the beta = theta - 2f selected values closest to the
       selected values' median.
    """
    check_bulyan(updates.shape[0], num_byzantine)
    selected = bulyan_select(pairwise_sq_distances(updates), num_byzantine)
    return bulyan_coordinates(updates[selected], num_byzantine)
