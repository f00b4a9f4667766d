"""Plain data passed between the orchestrator, the strategy, the engine and the clients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# A [P] vector, or a zero-argument callable that makes it when the client starts training
# (strategies pass callables so that a round's tasks hold no [K, P] block).
LazyVector = torch.Tensor | Callable[[], torch.Tensor] | None


def resolve(vector: LazyVector) -> torch.Tensor | None:
    """The tensor of a :data:`LazyVector` (calling it if it is a callable)."""
    return vector() if callable(vector) else vector


@dataclass
class ClientTask:
    """What the server asks of one client in a round, beyond "train from the global model".

    Strategies fill in their client-side terms (:meth:`Strategy.configure`), system
    heterogeneity sets the amount of local work, an attack may poison the labels. Every
    engine honours every field, so any algorithm runs on any engine.

    Attributes:
        client_id: index of the client in the partition.
        steps: local minibatch steps this round; None uses the trainer's epochs/steps.
        correction: [P] vector (flat ``mean``-key layout) added to every local gradient of
            the client's parameters, so it passes through the optimizer (momentum, Adam):
            FedDyn's ``-grad_k``. None: no term. May be a callable that makes the vector
            (see :func:`resolve`).
        step_correction: [P] vector ``v`` applied after every optimizer step as
            ``w <- w - lr * v``, outside the optimizer's momentum: SCAFFOLD's ``c - c_i``.
            With plain SGD both placements give the same step. May be a callable.
        prox_mu: proximal weight added to ``client.prox_mu`` for this client (FedDyn's
            alpha): the gradient gets ``prox_mu * (w - w_global)``.
        flip_labels: train on flipped labels ``C - 1 - y`` (a label-flipping attacker).
        initial_loss: also report the loss of the global model on the client's data
            before training (``metrics["initial_loss"]``; q-FedAvg needs F_k(w_t)).
    """

    client_id: int
    steps: int | None = None
    correction: LazyVector = None
    step_correction: LazyVector = None
    prox_mu: float = 0.0
    flip_labels: bool = False
    initial_loss: bool = False


@dataclass
class ClientResult:
    """What one client reports besides its update.

    Attributes:
        client_id: index of the client in the partition.
        num_samples: size of the client's local dataset (the FedAvg weight).
        counters: values of the ``max``-rule keys after training (integer buffers).
        metrics: local training statistics (``train_loss``, ``steps``, ...).
    """

    client_id: int
    num_samples: int
    counters: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientFailure:
    """A client whose update was rejected this round, and why (shown in the log)."""

    client_id: int
    reason: str


class ClientError(Exception):
    """Raised inside local training when a client's result is unusable (bad state_dict)."""


@dataclass
class RoundResults:
    """A round's updates as one matrix, for rules written over every row
    (:meth:`Strategy.aggregate <fedtorch.strategies.base.Strategy.aggregate>`).

    Attributes:
        clients: one entry per client whose update was accepted, in cohort order.
        deltas: [K, P] matrix; row i is ``clients[i]``'s local minus global values of the
            ``mean`` keys (memory-mapped when the round's rows exceed half of
            ``aggregation.memory_budget_mb``). Valid only during ``aggregate``: a strategy
            that keeps deltas beyond it must copy them.
        failures: clients that were asked to train but whose update was rejected (raised,
            non-finite values, malformed state); they are not in ``clients``.
    """

    clients: list[ClientResult]
    deltas: torch.Tensor
    failures: list[ClientFailure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clients)

    def sample_counts(self) -> torch.Tensor:
        """[K] float tensor of the clients' sample counts, on the deltas' device."""
        counts = [float(c.num_samples) for c in self.clients]
        return torch.tensor(counts, device=self.deltas.device, dtype=self.deltas.dtype)


def weighted_train_metrics(clients: list[ClientResult]) -> dict[str, float]:
    """Sample-weighted mean of the clients' local training loss and accuracy (and, under
    client=dpsgd, the largest sample-level epsilon any of them has spent so far)."""
    total = sum(r.num_samples for r in clients)
    if total == 0:
        return {}
    out = {
        key: sum(r.metrics[key] * r.num_samples for r in clients) / total
        for key in ("train_loss", "train_accuracy")
        if all(key in r.metrics for r in clients)
    }
    epsilons = [r.metrics["epsilon"] for r in clients if "epsilon" in r.metrics]
    if epsilons:
        out["client_epsilon_max"] = max(epsilons)
    return out
