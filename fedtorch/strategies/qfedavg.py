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

Streaming: a round keeps sum_k (F_k / top)^q Delta w_k in float64 for the running maximum
``top`` of the losses seen so far, rescaled by (old top / new top)^q whenever a larger loss
arrives, plus two scalars per client (F_k and ||Delta w_k||^2) for the denominator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult, ClientTask
from fedtorch.strategies.base import RunContext, Strategy
from fedtorch.strategies.checks import check_number
from fedtorch.strategies.rows import RowStore

LOSS_FLOOR = 1e-12


def qfedavg_step(
    global_vector: torch.Tensor,
    deltas: torch.Tensor,
    losses: torch.Tensor,
    q: float,
    lipschitz: float,
) -> torch.Tensor:
    """One q-FedAvg server update from the deltas [K, P] and initial losses [K]."""
    round_ = QFedAvgRound(q, lipschitz, global_vector)
    for delta, loss in zip(deltas, losses.tolist()):
        round_.add_update(delta, loss)
    return round_.finish()


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

    def start_round(
        self, global_vector: torch.Tensor, round_idx: int, rows: RowStore
    ) -> QFedAvgRound:
        return QFedAvgRound(self.q, self.lipschitz, global_vector)


class QFedAvgRound:
    """The numerator sum, rescaled to the running top loss, and per-client scalars."""

    def __init__(self, q: float, lipschitz: float, global_vector: torch.Tensor) -> None:
        self.q, self.lipschitz = q, lipschitz
        self.global_vector = global_vector
        self.numerator: torch.Tensor | None = None
        self.top = 0.0
        self.losses: list[float] = []
        self.grad_sq_norms: list[float] = []

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        self.add_update(delta, float(client.metrics["initial_loss"]))

    def add_update(self, delta: torch.Tensor, initial_loss: float) -> None:
        """Take Delta_k = delta [P] of a client whose initial loss F_k is ``initial_loss``."""
        loss = max(initial_loss, LOSS_FLOOR)
        grad = delta.double().mul_(-self.lipschitz)  # Delta w_k
        if self.numerator is None:
            self.numerator = torch.zeros_like(grad)
        if loss > self.top:
            if self.top > 0:
                self.numerator.mul_((self.top / loss) ** self.q)
            self.top = loss
        self.numerator.add_(grad, alpha=(loss / self.top) ** self.q)
        self.losses.append(loss)
        self.grad_sq_norms.append(float(grad.pow(2).sum()))

    def finish(self) -> torch.Tensor:
        ratio = torch.tensor(self.losses, dtype=torch.float64) / self.top
        sq = torch.tensor(self.grad_sq_norms, dtype=torch.float64)
        h = self.q * ratio.pow(self.q - 1) / self.top * sq + self.lipschitz * ratio.pow(self.q)
        step = self.numerator.div_(h.sum()).to(self.global_vector.dtype)
        return step.to(self.global_vector.device).neg_().add_(self.global_vector)
