"""Learning tasks: what a model's output means, its loss, its accuracy, a sample's weight.

A dataset names its task (``DataBundle.task``); the client trainer, both engines and the
evaluation ask the task instead of assuming classification:

* :class:`Classification`: inputs [B, ...], labels [B], logits [B, C]; mean cross-entropy;
  every sample weighs 1.
* :class:`LanguageModel`: token ids [B, T], next-token targets [B, T], logits [B, T, V];
  cross-entropy and accuracy over the targets that are not padding; a sequence weighs its
  non-pad targets (``weight_by=tokens``) or 1 (``sequences``). Test perplexity is
  ``exp(test_loss)``.

``per_sample`` gives each sample's summed loss, loss count, hits and accuracy count, so a
padded batch (the vectorized engine) and a per-client evaluation reduce exactly as the
plain batch does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fedtorch.errors import ConfigError

PerSample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Classification:
    """Single-label classification over ``num_classes`` classes."""

    name = "classification"

    def output_shape(self, inputs: torch.Tensor, num_classes: int) -> tuple[int, ...]:
        return (len(inputs), num_classes)

    def describe_output(self, num_classes: int) -> str:
        return f"[batch, {num_classes}] logits"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean loss of the batch and the number of samples it averages over."""
        return F.cross_entropy(logits, y), len(y)

    def loss_count(self, y: torch.Tensor) -> int:
        """The number of terms the batch's mean loss averages (its samples)."""
        return len(y)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Correct predictions in the batch and the number of predictions."""
        return (logits.argmax(dim=-1) == y).sum(), len(y)

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> PerSample:
        loss = F.cross_entropy(logits, y, reduction="none")
        ones = torch.ones_like(loss)
        return loss, ones, (logits.argmax(dim=-1) == y).to(loss.dtype), ones

    def sizes(self, y: torch.Tensor) -> torch.Tensor:
        """Each sample's weight in a client's size (the FedAvg weight): 1."""
        return torch.ones(len(y), dtype=torch.long, device=y.device)

    def extra_metrics(self, loss: float) -> dict[str, float]:
        return {}

    def evaluation_rows(self, batch_size: int, inputs: Any, outputs: int, memory_mb: float) -> int:
        """Rows of an evaluation batch: ``batch_size`` (a classifier's logits are small)."""
        return batch_size


class LanguageModel:
    """Next-token prediction: every position of a [B, T] sequence predicts its target.

    Args:
        pad: target id that is padding (left out of loss, accuracy and token counts).
        weight_by: ``tokens`` (a client's weight is its non-pad targets) or ``sequences``.
    """

    name = "language_model"

    def __init__(self, pad: int = 0, weight_by: str = "tokens") -> None:
        if weight_by not in ("tokens", "sequences"):
            raise ConfigError("data.weight_by", f"must be tokens or sequences, got {weight_by!r}")
        self.pad = pad
        self.weight_by = weight_by

    def output_shape(self, inputs: torch.Tensor, num_classes: int) -> tuple[int, ...]:
        return (*inputs.shape[:2], num_classes)

    def describe_output(self, num_classes: int) -> str:
        return f"[batch, sequence, {num_classes}] logits (one per position)"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=self.pad)
        return loss, (y != self.pad).sum()

    def loss_count(self, y: torch.Tensor) -> torch.Tensor:
        return (y != self.pad).sum()

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real = y != self.pad
        return ((logits.argmax(dim=-1) == y) & real).sum(), real.sum()

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> PerSample:
        per_token = F.cross_entropy(
            logits.flatten(0, -2), y.flatten(), ignore_index=self.pad, reduction="none"
        ).view(y.shape)
        real = (y != self.pad).to(per_token.dtype)
        hits = (logits.argmax(dim=-1) == y).to(per_token.dtype) * real
        count = real.sum(dim=1)
        return per_token.sum(dim=1), count, hits.sum(dim=1), count

    def sizes(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight_by == "sequences":
            return torch.ones(len(y), dtype=torch.long, device=y.device)
        return (y != self.pad).sum(dim=1)

    def extra_metrics(self, loss: float) -> dict[str, float]:
        return {"test_perplexity": math.exp(loss) if loss < 700 else math.inf}

    def evaluation_rows(self, batch_size: int, inputs: Any, outputs: int, memory_mb: float) -> int:
        """Rows of an evaluation batch whose float32 logits [rows, T, V] fit in
        ``memory_mb`` (at least one row, at most ``batch_size``): a batch of 2048 rows of
        512 tokens over a 32k vocabulary would otherwise hold 137 GB of logits."""
        per_row = int(inputs.shape[1]) * int(outputs) * 4
        return max(1, min(batch_size, int(memory_mb * 2**20) // max(per_row, 1)))


Task = Classification | LanguageModel
