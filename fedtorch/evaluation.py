"""Evaluation of the global model: test-set loss/accuracy and per-client accuracy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedtorch.data.loading import DatasetInputs, in_order
from fedtorch.tasks import Classification, Task


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int = 2048,
    task: Task | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)``, in eval mode.

    Means are over the task's units: samples, or a language model's non-pad tokens.
    """
    loss, count, correct, predicted = evaluation_totals(model, x, y, batch_size, task).tolist()
    return loss / max(count, 1.0), correct / max(predicted, 1.0)


@torch.inference_mode()
def evaluation_totals(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int = 2048,
    task: Task | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed loss, loss count, hits and predictions of ``model`` on ``(x, y)`` (float64
    [4]), so that evaluations of several models on several parts can be pooled. ``rows``
    restricts the evaluation to those rows."""
    task = task or Classification()
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=x.device)
    for xb, yb in in_order(x, y, batch_size, rows):
        totals += _terms(model, xb, yb, task)
    return totals


def _terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
    """One batch's summed loss, loss count, hits and predictions, float64 [4]: the only
    place they are computed, so totals made batch by batch anywhere agree bit for bit."""
    stats = task.per_sample(model(x), y)
    return torch.stack([s.sum(dtype=torch.float64) for s in stats])


def add_in_order(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Evaluation terms (float64 [4] each) added one after another, from zero, on the CPU:
    the same order gives the same bits."""
    total = torch.zeros(4, dtype=torch.float64)
    for term in terms:
        total += term.cpu()
    return total


@torch.inference_mode()
def batch_totals(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int,
    task: Task,
    batches: list[int],
) -> torch.Tensor:
    """:func:`evaluation_totals`' per-batch terms for the batches numbered ``batches``
    (batch b holds rows [b * batch_size, (b + 1) * batch_size)), float64 [len(batches),
    4]: added in batch order they give its totals bit for bit, wherever each was made."""
    model.eval()
    out = torch.zeros(len(batches), 4, dtype=torch.float64)
    for i, b in enumerate(batches):
        rows = torch.arange(b * batch_size, min((b + 1) * batch_size, len(y)))
        for xb, yb in in_order(x, y, batch_size, rows):
            out[i] = _terms(model, xb, yb, task).cpu()
    return out


def num_batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


@torch.inference_mode()
def per_client_accuracy(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    owner: torch.Tensor,
    num_clients: int,
    batch_size: int = 2048,
    task: Task | None = None,
) -> torch.Tensor:
    """Accuracy of ``model`` on each client's own data, shape [num_clients].

    ``owner[i]`` is the client holding training sample ``i`` (-1 if none). One pass over the
    training set, then a scatter by owner.
    """
    task = task or Classification()
    model.eval()
    correct = torch.empty(len(x), device=x.device)
    predicted = torch.empty(len(x), device=x.device)
    start = 0
    for xb, yb in in_order(x, y, batch_size):
        _, _, hits, total = task.per_sample(model(xb), yb)
        correct[start : start + len(yb)] = hits
        predicted[start : start + len(yb)] = total
        start += len(yb)
    held = owner >= 0
    hits = torch.bincount(owner[held], weights=correct[held], minlength=num_clients)
    sizes = torch.bincount(owner[held], weights=predicted[held], minlength=num_clients)
    return (hits / sizes.clamp_min(1)).cpu()


def worst_fraction_mean(values: torch.Tensor, fraction: float = 0.1) -> float:
    """Mean of the lowest ``fraction`` of ``values`` (at least one value)."""
    k = max(1, int(len(values) * fraction))
    return float(values.sort().values[:k].mean())
