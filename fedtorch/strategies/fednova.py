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
"""

from __future__ import annotations

import torch

from fedtorch.errors import ConfigError
from fedtorch.results import RoundResults
from fedtorch.strategies.aggregate import weighted_average
from fedtorch.strategies.base import RunContext, Strategy


def local_normalizer(steps: int, momentum: float = 0.0) -> float:
    """||a||_1 for ``steps`` local SGD steps with heavy-ball ``momentum``."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def fednova_update(
    deltas: torch.Tensor, weights: torch.Tensor, normalizers: torch.Tensor
) -> torch.Tensor:
    """tau_eff * sum_i p_i Delta_i / a_i with p = weights / sum(weights). Returns [P]."""
    p = weights / weights.sum()
    tau_eff = (p * normalizers).sum()
    return tau_eff * weighted_average(deltas / normalizers[:, None], p)


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

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        counts = results.sample_counts()
        weights = counts if self.weighted else torch.ones_like(counts)
        normalizers = torch.tensor(
            [local_normalizer(int(c.metrics["steps"]), self.momentum) for c in results.clients],
            dtype=results.deltas.dtype,
            device=results.deltas.device,
        )
        return global_vector + fednova_update(results.deltas, weights, normalizers)
