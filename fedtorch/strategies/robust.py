"""Byzantine-robust aggregation: the server replaces FedAvg's mean of the deltas with a
rule that a minority of arbitrary (malicious) updates cannot drag far.

Each strategy applies one pure function of :mod:`fedtorch.strategies.aggregate` to the
round's deltas [K, P] and steps ``x <- x + server_lr * rule(deltas)``. All are unweighted
(sample counts are reported by the clients, so an attacker could inflate its own).

``num_byzantine`` (f) is the number of malicious clients the rule must tolerate per
round. When a round has too few clients for the rule's bound (dropouts), the strategy
raises a ValueError naming the bound rather than silently averaging.
"""

from __future__ import annotations

import torch

from fedtorch.errors import ConfigError, FedtorchError
from fedtorch.results import RoundResults
from fedtorch.strategies import aggregate
from fedtorch.strategies.base import RunContext, Strategy
from fedtorch.strategies.checks import check_int, check_number


class _Robust(Strategy):
    min_clients_key = "num_byzantine"

    def __init__(self, server_lr: float = 1.0) -> None:
        check_number("server_lr", server_lr, 0.0, open_low=True)
        self.server_lr = server_lr

    def min_clients(self) -> int:
        """Fewest updates the rule is defined for."""
        return 1

    def bind(self, context: RunContext) -> None:
        need = self.min_clients()
        if context.clients_per_round < need:
            raise ConfigError(
                f"strategy.{self.min_clients_key}",
                f"{type(self).__name__} with these settings needs at least {need} clients "
                f"per round, got clients_per_round={context.clients_per_round}",
            )

    def rule(self, deltas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        if len(results) < self.min_clients():
            raise FedtorchError(
                f"round {round_idx}: {type(self).__name__} needs at least "
                f"{self.min_clients()} updates, {len(results)} arrived (drop-outs?)"
            )
        return global_vector + self.server_lr * self.rule(results.deltas)


class CoordinateMedian(_Robust):
    """Coordinate-wise median of the deltas (Yin et al. 2018)."""

    def rule(self, deltas: torch.Tensor) -> torch.Tensor:
        return aggregate.coordinate_median(deltas)


class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Args:
        beta: fraction trimmed from each end of every coordinate, in [0, 0.5) (so some
            values always remain).
    """

    def __init__(self, beta: float = 0.2, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        check_number("beta", beta, 0.0, 0.5)
        self.beta = beta

    def rule(self, deltas: torch.Tensor) -> torch.Tensor:
        return aggregate.trimmed_mean(deltas, self.beta)


class Krum(_Robust):
    """Krum and Multi-Krum (Blanchard et al. 2017).

    Args:
        num_byzantine: f, malicious clients tolerated per round (needs K > 2f + 2).
        num_selected: m, updates averaged; 1 is Krum, more is Multi-Krum.
    """

    def __init__(self, num_byzantine: int = 1, num_selected: int = 1, server_lr: float = 1.0):
        super().__init__(server_lr)
        check_int("num_byzantine", num_byzantine, 0)
        check_int("num_selected", num_selected, 1)
        self.num_byzantine, self.num_selected = num_byzantine, num_selected

    def min_clients(self) -> int:
        return max(2 * self.num_byzantine + 3, self.num_selected)

    def rule(self, deltas: torch.Tensor) -> torch.Tensor:
        return aggregate.multi_krum(deltas, self.num_byzantine, self.num_selected)


class Bulyan(_Robust):
    """Bulyan over Krum (El Mhamdi et al. 2018).

    Args:
        num_byzantine: f, malicious clients tolerated per round (needs K >= 4f + 3).
    """

    def __init__(self, num_byzantine: int = 1, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        check_int("num_byzantine", num_byzantine, 0)
        self.num_byzantine = num_byzantine

    def min_clients(self) -> int:
        return 4 * self.num_byzantine + 3

    def rule(self, deltas: torch.Tensor) -> torch.Tensor:
        return aggregate.bulyan(deltas, self.num_byzantine)
