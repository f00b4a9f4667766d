"""Byzantine-robust aggregation: the server replaces FedAvg's mean of the deltas with a
rule that a minority of arbitrary (malicious) updates cannot drag far.

Each strategy applies one rule of :mod:`fedtorch.strategies.aggregate` to the round's
deltas [K, P] and steps ``x <- x + server_lr * rule(deltas)``. All are unweighted (sample
counts are reported by the clients, so an attacker could inflate its own).

These rules need every row, so the round's deltas go to a
:class:`~fedtorch.strategies.rows.RowStore`: in memory while they fit
``aggregation.memory_budget_mb``, else in a file in the run folder. The rules read the
store in column blocks that fit the budget: coordinate-wise rules (median, trimmed mean,
Bulyan's second step) block by block, distance-based picks (Krum, Bulyan's first step)
from the K x K Gram matrix summed over blocks.

``num_byzantine`` (f) is the number of malicious clients the rule must tolerate per
round. When a round has too few clients for the rule's bound (dropouts), the strategy
raises a ValueError naming the bound rather than silently averaging.
"""

from __future__ import annotations

import torch

from fedtorch.errors import ConfigError, FedtorchError
from fedtorch.results import ClientResult, RoundResults
from fedtorch.strategies import aggregate
from fedtorch.strategies.base import RunContext, Strategy
from fedtorch.strategies.checks import check_int, check_number
from fedtorch.strategies.rows import RowStore
from fedtorch.strategies.streaming import RowCollector


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

    def rule(self, rows: RowStore) -> torch.Tensor:
        """The robust aggregate [P] of the rows."""
        raise NotImplementedError

    def start_round(self, global_vector: torch.Tensor, round_idx: int, rows: RowStore):
        def finish(clients: list[ClientResult], store: RowStore) -> torch.Tensor:
            return self._step(global_vector, store, round_idx)

        return RowCollector(rows, finish)

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        return self._step(global_vector, RowStore.of(results.deltas), round_idx)

    def _step(self, global_vector: torch.Tensor, rows: RowStore, round_idx: int) -> torch.Tensor:
        if len(rows) < self.min_clients():
            raise FedtorchError(
                f"round {round_idx}: {type(self).__name__} needs at least "
                f"{self.min_clients()} updates, {len(rows)} arrived (drop-outs?)"
            )
        return global_vector + self.server_lr * self.rule(rows)


def _blockwise(rows: RowStore, rule, indices=None) -> torch.Tensor:
    """A coordinate-wise ``rule`` ([k, w] -> [w]) applied block by block. Returns [P]."""
    out = torch.empty(rows.size, dtype=rows.dtype, device=rows.device)
    for columns, block in rows.column_blocks(indices):
        out[columns] = rule(block)
    return out


def _distances(rows: RowStore) -> torch.Tensor:
    """[K, K] squared distances between the rows (float64)."""
    return aggregate.distances_from_gram(*rows.gram())


class CoordinateMedian(_Robust):
    """Coordinate-wise median of the deltas (Yin et al. 2018)."""

    def rule(self, rows: RowStore) -> torch.Tensor:
        return _blockwise(rows, aggregate.coordinate_median)


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

    def rule(self, rows: RowStore) -> torch.Tensor:
        return _blockwise(rows, lambda block: aggregate.trimmed_mean(block, self.beta))


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

    def rule(self, rows: RowStore) -> torch.Tensor:
        aggregate.check_krum(len(rows), self.num_byzantine)
        chosen = aggregate.multi_krum_select(
            _distances(rows), self.num_byzantine, self.num_selected
        )
        return rows.mean_of(chosen)


class Bulyan(_Robust):
    """Bulyan over Krum (El Mhamdi et al. 2018).

    The repeated Krum picks of Bulyan's first step run on fewer and fewer updates, down to
    2f + 1, where Krum's K - f - 2 neighbours are 0 or fewer (with f = 1, the last pick
    scores 3 updates over 0 neighbours). Every score would then be 0 and the first update
    in cohort order would win, so the result would depend on the clients' order. There each
    score uses the nearest neighbour instead (max(1, K - f - 2) neighbours, as Flower's
    Bulyan does), so an outlier no longer wins a pick by coming first. Exactly equal
    scores (two updates that are each other's nearest neighbour) still go to the earlier
    client, as in any Krum.

    Args:
        num_byzantine: f, malicious clients tolerated per round (needs K >= 4f + 3).
    """

    def __init__(self, num_byzantine: int = 1, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        check_int("num_byzantine", num_byzantine, 0)
        self.num_byzantine = num_byzantine

    def min_clients(self) -> int:
        return 4 * self.num_byzantine + 3

    def rule(self, rows: RowStore) -> torch.Tensor:
        f = self.num_byzantine
        aggregate.check_bulyan(len(rows), f)
        selected = aggregate.bulyan_select(_distances(rows), f)
        return _blockwise(rows, lambda block: aggregate.bulyan_coordinates(block, f), selected)
