"""Plain data passed between the engine, the strategy and the orchestrator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ClientResult:
    """What one client sends back after local training.

    Attributes:
        client_id: index of the client in the partition.
        num_samples: size of the client's local dataset (the FedAvg weight).
        delta: local minus global values of the ``mean`` keys, flat, shape [P].
        counters: values of the ``max``-rule keys after training (integer buffers).
        metrics: local training statistics (``train_loss``, ``train_accuracy``, ``steps``).
    """

    client_id: int
    num_samples: int
    delta: torch.Tensor
    counters: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
