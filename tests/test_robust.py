"""Robust aggregation rules on small matrices worked out by hand, and the strategies' bounds."""

from __future__ import annotations

import pytest
import torch

from fedtorch.errors import ConfigError, FedtorchError
from fedtorch.results import ClientResult, RoundResults
from fedtorch.strategies import Bulyan, CoordinateMedian, Krum, RunContext, TrimmedMean
from fedtorch.strategies import aggregate as agg
from fedtorch.strategies.rows import BLOCK_OVERHEAD, RowStore

# Five clients; the last is an attacker far away.
U = torch.tensor(
    [[0.0, 0.0], [2.0, 1.0], [3.0, -1.0], [4.0, 0.5], [100.0, -100.0]],
)


def test_coordinate_median():
    assert torch.equal(agg.coordinate_median(U), torch.tensor([3.0, 0.0]))
    # Even K: mean of the two middle values.
    assert torch.equal(agg.coordinate_median(U[:4]), torch.tensor([2.5, 0.25]))


def test_trimmed_mean():
    # beta = 0.2 of 5 -> drop 1 from each end: x: mean(2,3,4) = 3; y: mean(-1,0,0.5) -> sorted
    # [-100,-1,0,0.5,1] -> mean(-1, 0, 0.5) = -1/6
    assert torch.allclose(agg.trimmed_mean(U, 0.2), torch.tensor([3.0, -1 / 6]))
    assert torch.allclose(agg.trimmed_mean(U, 0.0), U.mean(0))


def test_krum_and_multi_krum():
    # f = 1: each score sums the K - f - 2 = 2 nearest squared distances.
    d = torch.cdist(U.double(), U.double()) ** 2
    d.fill_diagonal_(float("inf"))
    expected = d.topk(2, dim=1, largest=False).values.sum(1)
    assert torch.allclose(agg.krum_scores(U, 1), expected)
    # Scores: row 0 ([0,0]): 5 + 10 = 15; row 1 ([2,1]): 4.25 + 5 = 9.25; row 2 ([3,-1]):
    # 3.25 + 5 = 8.25; row 3 ([4,0.5]): 3.25 + 4.25 = 7.5; the attacker's is huge.
    assert torch.allclose(agg.krum_scores(U, 1)[:4].float(), torch.tensor([15, 9.25, 8.25, 7.5]))
    assert torch.equal(agg.multi_krum(U, 1, 1), U[3])
    assert torch.allclose(agg.multi_krum(U, 1, 2), (U[2] + U[3]) / 2)
    with pytest.raises(ValueError, match="2f \\+ 2"):
        agg.multi_krum(U[:4], 1, 1)


def test_bulyan_by_hand():
    # K = 7, f = 1: theta = 5 picked by repeated Krum, beta = 3 closest to the median.
    u = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [50.0], [-60.0]])
    out = agg.bulyan(u, 1)
    # Repeated Krum drops the two outliers: selected {0,1,2,3,4}, median 2, 3 closest:
    # {1, 2, 3} -> mean 2.
    assert torch.equal(out, torch.tensor([2.0]))
    with pytest.raises(ValueError, match="4f \\+ 3"):
        agg.bulyan(u[:6], 1)


def round_of(deltas):
    return RoundResults([ClientResult(i, 1) for i in range(len(deltas))], deltas)


def test_strategies_step_from_the_global_vector():
    x = torch.tensor([10.0, 10.0])
    assert torch.equal(CoordinateMedian().aggregate(x, round_of(U), 1), x + torch.tensor([3, 0]))
    half = TrimmedMean(beta=0.2, server_lr=0.5).aggregate(x, round_of(U), 1)
    assert torch.allclose(half, x + 0.5 * torch.tensor([3.0, -1 / 6]))
    assert torch.equal(Krum(num_byzantine=1).aggregate(x, round_of(U), 1), x + U[3])


def test_bounds_checked_before_training_and_at_aggregation():
    ctx = RunContext(
        num_clients=10,
        clients_per_round=6,
        size=2,
        param_mask=torch.ones(2),
        optimizer=torch.optim.SGD,
    )
    with pytest.raises(ConfigError, match="^strategy.num_byzantine:.*at least 7"):
        Bulyan(num_byzantine=1).bind(ctx)
    with pytest.raises(ConfigError, match="^strategy.num_byzantine:.*at least 7"):
        Krum(num_byzantine=2).bind(ctx)
    Krum(num_byzantine=1).bind(ctx)
    with pytest.raises(FedtorchError, match="round 3: Krum needs at least 5 updates, 4"):
        Krum(num_byzantine=1).aggregate(torch.zeros(2), round_of(U[:4]), 3)
    with pytest.raises(ConfigError, match="^strategy.beta:"):
        TrimmedMean(beta=0.5)


def test_bulyan_does_not_depend_on_where_the_outlier_sits_in_the_cohort():
    """f = 1: the last Krum pick sees 2f + 1 = 3 updates and K - f - 2 = 0 neighbours.
    Scoring over no neighbours made every score 0, so the first remaining row won: 3.333
    with the outlier first, 3.0 with it last. The nearest neighbour is used there."""
    honest = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    # Picks 3, 2, 5, 1 (ties go to the earlier client), then of {100, 4, 7} by nearest
    # neighbour 4 (9 vs 93^2); selected {1, 2, 3, 4, 5}: median 3, closest {2, 3, 4} -> 3.
    for position in range(7):
        u = torch.tensor([[v] for v in honest[:position] + [100.0] + honest[position:]])
        assert torch.equal(agg.bulyan(u, 1), torch.tensor([3.0])), position
        assert torch.equal(Bulyan(1).aggregate(torch.zeros(1), round_of(u), 1), torch.tensor([3.0]))


@pytest.mark.parametrize(
    "strategy",
    [CoordinateMedian(), TrimmedMean(beta=0.2), Krum(1, 2), Bulyan(1)],
    ids=["median", "trimmed_mean", "multi_krum", "bulyan"],
)
def test_rules_over_spilled_rows_equal_the_in_memory_rule(strategy, tmp_path):
    """Past the memory budget the rows go to a file and the rules read them back in column
    blocks; the result equals the rule on the in-memory matrix."""
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(9, 1000, generator=gen)
    deltas[0] += 30  # an outlier
    x = torch.randn(1000, generator=gen)
    expected = strategy.aggregate(x, round_of(deltas), 1)
    budget = 9 * 1000 * 4 // 3  # a third of the matrix: blocks of 1000 / 12 columns
    rows = RowStore(9, 1000, budget, tmp_path)
    assert rows.spilled
    aggregator = strategy.start_round(x, 1, rows)
    for i, row in enumerate(deltas):
        aggregator.add(ClientResult(i, 1), row.clone())
    assert (tmp_path / "rows.bin").stat().st_size == deltas.numel() * 4
    out = aggregator.finish()
    assert torch.allclose(out, expected, atol=1e-6)
    assert not (tmp_path / "rows.bin").exists()  # the spill file goes with the round


def test_row_store_blocks_stay_within_the_budget(tmp_path):
    budget = 4 * 10_000 * 2  # half the rows' bytes: they spill
    rows = RowStore(4, 10_000, budget, tmp_path)
    data = torch.arange(40_000.0).view(4, 10_000)
    for row in data:
        rows.append(row)
    blocks = list(rows.column_blocks())
    assert len(blocks) > 1
    assert all(b.numel() * 4 * BLOCK_OVERHEAD <= budget for _, b in blocks)
    assert torch.equal(torch.cat([b.clone() for _, b in rows.column_blocks()], dim=1), data)
    assert torch.equal(rows.matrix(), data)
    assert torch.equal(rows.mean_of([1, 3]), data[[1, 3]].mean(0))
    gram, sq = rows.gram()
    assert torch.allclose(gram, data.double() @ data.double().T)
    rows.close()


def test_rows_in_memory_are_read_in_blocks_within_the_budget():
    """In memory (the rows take at most half the budget), the rules still work on column
    blocks, so their temporaries fit the other half."""
    data = torch.randn(3, 10_000, generator=torch.Generator().manual_seed(1))
    budget = 2 * data.numel() * 4  # the rows fit in half
    rows = RowStore(3, 10_000, budget)
    for row in data:
        rows.append(row)
    assert not rows.spilled
    blocks = list(rows.column_blocks())
    assert len(blocks) > 1 and all(b.numel() * 4 * BLOCK_OVERHEAD <= budget // 2 for _, b in blocks)
    assert torch.equal(CoordinateMedian().rule(rows), agg.coordinate_median(data))
