"""Aggregation math against hand computations, BatchNorm buffers included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult, RoundResults
from fedtorch.state.layout import StateLayout, aggregate_max
from fedtorch.strategies import FedAvg
from fedtorch.strategies.aggregate import weighted_average


def round_results(sizes: list[int], deltas: list[list[float]]) -> RoundResults:
    clients = [ClientResult(client_id=i, num_samples=n) for i, n in enumerate(sizes)]
    return RoundResults(clients, torch.tensor(deltas))


def test_weighted_average_by_hand():
    updates = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]
    assert torch.allclose(
        weighted_average(updates, torch.tensor([1.0, 3.0])), torch.tensor([2.5, 5.0])
    )


def test_fedavg_weighted_and_uniform():
    w = torch.tensor([1.0, -1.0, 0.5])
    results = round_results([100, 300], [[1.0, 0.0, 2.0], [-1.0, 4.0, 2.0]])
    # weighted: w + (100*d0 + 300*d1)/400 = w + [-0.5, 3.0, 2.0]
    assert torch.allclose(
        FedAvg(weighted=True).aggregate(w, results, 1), torch.tensor([0.5, 2.0, 2.5])
    )
    # uniform: w + (d0 + d1)/2 = w + [0.0, 2.0, 2.0]
    assert torch.allclose(
        FedAvg(weighted=False).aggregate(w, results, 1), torch.tensor([1.0, 1.0, 2.5])
    )


def test_fedavg_equals_average_of_client_models():
    """FedAvg on deltas is the sample-weighted mean of the client models themselves."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=gen)
    models = [torch.randn(5, generator=gen) for _ in range(3)]
    sizes = [10, 20, 70]
    results = round_results(sizes, [(m - w).tolist() for m in models])
    expected = sum(n * m for n, m in zip(sizes, models)) / sum(sizes)
    assert torch.allclose(FedAvg().aggregate(w, results, 1), expected, atol=1e-6)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def test_layout_rules_for_batchnorm():
    state = BNNet().state_dict()
    layout = StateLayout(state)
    assert layout.rules["bn.running_mean"] == "mean"
    assert layout.rules["bn.running_var"] == "mean"
    assert layout.rules["bn.num_batches_tracked"] == "max"
    # fc.weight 4 + fc.bias 2 + bn.weight 2 + bn.bias 2 + running_mean 2 + running_var 2
    assert layout.size == 14


def test_batchnorm_buffers_averaged_and_counter_kept_integer():
    base = BNNet().state_dict()
    layout = StateLayout(base)
    clients = []
    for mean, count in (([1.0, 2.0], 5), ([3.0, 6.0], 7)):
        s = {k: v.clone() for k, v in base.items()}
        s["bn.running_mean"] = torch.tensor(mean)
        s["bn.num_batches_tracked"] = torch.tensor(count)
        clients.append(s)
    g = layout.flatten(base)
    results = RoundResults(
        [
            ClientResult(i, n, {"bn.num_batches_tracked": s["bn.num_batches_tracked"]})
            for i, (s, n) in enumerate(zip(clients, (1, 3)))
        ],
        torch.stack([layout.flatten(s) - g for s in clients]),
    )
    new_state = {k: v.clone() for k, v in base.items()}
    layout.unflatten_into(FedAvg().aggregate(g, results, 1), new_state)
    new_state.update(aggregate_max([c.counters for c in results.clients], layout.keys("max")))
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]
    assert torch.allclose(new_state["bn.running_mean"], torch.tensor([2.5, 5.0]))
    assert new_state["bn.num_batches_tracked"].dtype == torch.int64
    assert int(new_state["bn.num_batches_tracked"]) == 7


def test_key_rules_first_match_wins_and_validate():
    state = BNNet().state_dict()
    layout = StateLayout(
        state, [{"pattern": r"^bn\.", "rule": "local"}, {"pattern": "fc", "rule": "keep"}]
    )
    assert layout.keys("local") == [k for k in state if k.startswith("bn.")]
    assert layout.keys("keep") == ["fc.weight", "fc.bias"]
    assert layout.size == 0
    with pytest.raises(ConfigError, match=r"key_rules\[0\]\.rule"):
        StateLayout(state, [{"pattern": "fc", "rule": "median"}])
    with pytest.raises(ConfigError, match=r"key_rules\[0\]\.pattern"):
        StateLayout(state, [{"pattern": "(", "rule": "mean"}])
    with pytest.raises(ConfigError, match="num_batches_tracked"):
        StateLayout(state, [{"pattern": "num_batches", "rule": "mean"}])


def test_flatten_roundtrip_and_bytes():
    state = BNNet().state_dict()
    layout = StateLayout(state)
    vec = layout.flatten(state)
    copy = {k: torch.zeros_like(v) for k, v in state.items()}
    layout.unflatten_into(vec, copy)
    for k in layout.keys("mean"):
        assert torch.equal(copy[k], state[k])
    assert layout.bytes_of(state, ("mean",)) == 14 * 4
    assert layout.bytes_of(state, ("mean", "max")) == 14 * 4 + 8
