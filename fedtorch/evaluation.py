"""Evaluation of the global model: test-set loss/accuracy and per-client accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    n = max(len(x), 1)
    return float(loss) / n, float(correct) / n


@torch.inference_mode()
def per_client_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    owner: torch.Tensor,
    num_clients: int,
    batch_size: int = 2048,
) -> torch.Tensor:
    """Accuracy of ``model`` on each client's own data, shape [num_clients].

    ``owner[i]`` is the client holding training sample ``i`` (-1 if none). One pass over the
    training set, then a scatter by owner.
    """
    model.eval()
    correct = torch.empty(len(x), device=x.device)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct[start : start + batch_size] = (
            logits.argmax(dim=1) == y[start : start + batch_size]
        ).float()
    held = owner >= 0
    hits = torch.bincount(owner[held], weights=correct[held], minlength=num_clients)
    sizes = torch.bincount(owner[held], minlength=num_clients).clamp_min(1)
    return (hits / sizes).cpu()


def worst_fraction_mean(values: torch.Tensor, fraction: float = 0.1) -> float:
    """Mean of the lowest ``fraction`` of ``values`` (at least one value)."""
    k = max(1, int(len(values) * fraction))
    return float(values.sort().values[:k].mean())
