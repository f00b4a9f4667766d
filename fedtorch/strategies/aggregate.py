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
