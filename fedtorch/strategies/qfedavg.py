"""q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning").

Minimises sum_k p_k F_k^(q+1) / (q+1): larger q weights clients with high loss more,
trading average accuracy for a more uniform accuracy across clients (q = 0 is FedAvg with
uniform weights). With L the Lipschitz estimate (1 / local lr by default), F_k = F_k(w_t)
the global model's loss on client k before training and delta_k = w_k - w_t:

    Delta w_k = -L delta_k
    Delta_k   = F_k^q Delta w_k
    h_k       = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q
    w_(t+1)   = w_t - sum_k Delta_k / sum_k h_k

Numerics: F_k is floored at LOSS_FLOOR (a client the global model already fits exactly
would otherwise give 0^(q-1) = inf, and 0 * inf = NaN for q = 0), and numerator and
denominator are both divided by max_k F_k^q in float64, which leaves the step unchanged
but keeps F_k^q from underflowing to 0 / 0 for large q.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch.errors import ConfigError
from fedtorch.results import ClientTask, RoundResults
from fedtorch.strategies.base import RunContext, Strategy
from fedtorch.strategies.checks import check_number

LOSS_FLOOR = 1e-12


def qfedavg_step(
    global_vector: torch.Tensor,
    deltas: torch.Tensor,
    losses: torch.Tensor,
    q: float,
    lipschitz: float,
) -> torch.Tensor:
    """One q-FedAvg server update from the deltas [K, P] and initial losses [K]."""
    grads = -lipschitz * deltas.double()  # Delta w_k
    loss = losses.double().clamp_min(LOSS_FLOOR)
    top = loss.max()
    ratio = loss / top
    weight = ratio.pow(q)  # F_k^q / top^q
    numerator = (weight[:, None] * grads).sum(dim=0)
    # q F_k^(q-1) / top^q = q (F_k / top)^(q-1) / top
    h = q * ratio.pow(q - 1) / top * grads.pow(2).sum(dim=1) + lipschitz * weight
    return global_vector - (numerator / h.sum()).to(global_vector.dtype)


class QFedAvg(Strategy):
    """Fair federated averaging.

    Args:
        q: fairness exponent (0 = uniform FedAvg; the paper uses 0.1-15).
        lipschitz: L; null uses 1 / the local learning rate, as the paper does.
    """

    def __init__(self, q: float = 1.0, lipschitz: float | None = None) -> None:
        check_number("q", q, 0.0)
        if lipschitz is not None:
            check_number("lipschitz", lipschitz, 0.0, open_low=True)
        self.q, self.lipschitz = q, lipschitz

    def bind(self, context: RunContext) -> None:
        if self.lipschitz is None:
            lr = context.optimizer_defaults.get("lr")
            if not isinstance(lr, (int, float)) or lr <= 0:
                raise ConfigError("strategy.lipschitz", "is null and the local lr is unknown")
            self.lipschitz = 1.0 / lr

    def configure(self, cohort: Sequence[int], round_idx: int) -> list[ClientTask]:
        return [ClientTask(client_id=int(c), initial_loss=True) for c in cohort]

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        losses = torch.tensor(
            [c.metrics["initial_loss"] for c in results.clients],
            dtype=results.deltas.dtype,
            device=results.deltas.device,
        )
        return qfedavg_step(global_vector, results.deltas, losses, self.q, self.lipschitz)
