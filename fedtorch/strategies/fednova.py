"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization").

Clients that run more local steps move further; plain FedAvg then drifts towards their
objectives. FedNova divides each client's update by the length of its local trajectory
and rescales the average by the cohort's effective number of steps. With p_i = n_i / n
(cohort sample weights) and a_i = ||a_i||_1 the client's normaliser:

    d_i   = Delta_i / a_i                   (normalised update)
    tau   = sum_i p_i a_i                   (effective local steps)
    x    <- x + tau * sum_i p_i d_i

For local SGD with momentum rho (PyTorch's form, buf <- rho buf + g), after tau_i steps
a_i = sum_{j=1}^{tau_i} (1 - rho^j) / (1 - rho); without momentum a_i = tau_i. Weight
decay counts as part of the gradient, as in the paper.

Streaming: a round keeps the running mean of d_i weighted by p_i and the scalar sums of
p_i and p_i a_i, so tau * sum_i p_i d_i = (sum w a / sum w) (sum w d / sum w).
"""

from __future__ import annotations

import torch

from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult
from fedtorch.strategies.base import RunContext, Strategy
from fedtorch.strategies.rows import RowStore


def local_normalizer(steps: int, momentum: float = 0.0) -> float:
    """||a||_1 for ``steps`` local SGD steps with heavy-ball ``momentum``."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(Strategy):
    """Normalised averaging; the local optimizer must be SGD (momentum allowed).

    Args:
        weighted: p_i by sample count (the paper) or uniform.
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted
        self.momentum = 0.0

    def bind(self, context: RunContext) -> None:
        opt, defaults = context.optimizer, context.optimizer_defaults
        if not issubclass(opt, torch.optim.SGD):
            raise ConfigError(
                "client.optimizer", f"FedNova's normaliser assumes SGD, got {opt.__name__}"
            )
        if defaults.get("nesterov") or defaults.get("dampening"):
            raise ConfigError(
                "client.optimizer",
                "FedNova supports heavy-ball momentum only (no nesterov, dampening=0)",
            )
        if context.prox_mu:
            raise ConfigError("client.prox_mu", "FedNova here assumes no proximal term; set 0")
        self.momentum = float(defaults.get("momentum", 0.0))

    def start_round(
        self, global_vector: torch.Tensor, round_idx: int, rows: RowStore
    ) -> _FedNovaRound:
        return _FedNovaRound(self, global_vector)


class _FedNovaRound:
    """Running sums of (w_i / a_i) Delta_i, w_i and w_i a_i (w: sample count or 1)."""

    def __init__(self, strategy: FedNova, global_vector: torch.Tensor) -> None:
        self.strategy, self.global_vector = strategy, global_vector
        self.normalized_sum: torch.Tensor | None = None
        self.weight = 0.0
        self.weighted_steps = 0.0

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        s = self.strategy
        weight = float(client.num_samples) if s.weighted else 1.0
        normalizer = local_normalizer(int(client.metrics["steps"]), s.momentum)
        if self.normalized_sum is None:
            self.normalized_sum = torch.zeros_like(delta)
        self.normalized_sum.add_(delta, alpha=weight / normalizer)
        self.weight += weight
        self.weighted_steps += weight * normalizer

    def finish(self) -> torch.Tensor:
        if self.normalized_sum is None or not self.weight > 0:
            raise ValueError("aggregation weights must sum to a positive number")
        tau_eff = self.weighted_steps / self.weight
        return self.normalized_sum.mul_(tau_eff / self.weight).add_(self.global_vector)
