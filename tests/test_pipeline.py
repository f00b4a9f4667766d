"""The update pipeline: engines hand over one update at a time, in cohort order, and the
aggregators keep running sums in that order; per-client state changes only when a round
finishes."""

from __future__ import annotations

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.pipeline.pipeline import RejectedUpdate, UpdatePipeline, check_finite
from fedtorch.results import ClientFailure, ClientResult
from fedtorch.state.client_store import ClientStateStore
from fedtorch.strategies import FedAvg, Scaffold
from fedtorch.strategies.rows import RowStore
from tests.conftest import FAST, compose_config
from tests.test_algorithms import context


class RecordingSink:
    """Keeps a copy of every update, the buffer it came in, and the failures."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.deltas: list[torch.Tensor] = []
        self.buffers: set[int] = set()
        self.failures: list[ClientFailure] = []

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        self.ids.append(client.client_id)
        self.deltas.append(delta.clone())
        self.buffers.add(delta.data_ptr())

    def fail(self, failure: ClientFailure) -> None:
        self.failures.append(failure)


def run_engine(tmp_path, engine_overrides):
    cfg = compose_config(
        [*FAST, "num_clients=8", "data.num_train=999", "partition=dirichlet", *engine_overrides]
    )
    orch = build(cfg, tmp_path)
    tasks = orch.strategy.configure([5, 0, 3, 7, 1, 6], 1)
    sink = RecordingSink()
    orch.engine.run(
        orch.trainer, tasks, orch.shards, orch.global_state, orch.global_vector, 1, sink
    )
    return sink


def test_engines_hand_updates_over_in_cohort_order(tmp_path):
    sequential = run_engine(tmp_path / "s", ["engine=sequential"])
    assert sequential.ids == [5, 0, 3, 7, 1, 6]
    assert len(sequential.buffers) == 1  # one [P] buffer, reused for every client
    vectorized = run_engine(tmp_path / "v", ["engine=vectorized", "engine.cohort_size=4"])
    assert vectorized.ids == [5, 0, 3, 7, 1, 6]  # clients of unequal sizes, two cohorts
    for a, b in zip(sequential.deltas, vectorized.deltas):
        assert torch.allclose(a, b, atol=1e-5)


def test_pipeline_rejects_non_finite_updates_and_keeps_order():
    seen = []

    class Collect:
        def add(self, client, update):
            seen.append((client.client_id, update.clone()))

        def finish(self):
            return torch.zeros(2)

    def double(client, update):
        return update.mul_(2)

    pipeline = UpdatePipeline([check_finite, double], Collect())
    pipeline.add(ClientResult(4, 1), torch.tensor([1.0, 2.0]))
    pipeline.add(ClientResult(2, 1), torch.tensor([float("nan"), 0.0]))
    pipeline.fail(ClientFailure(9, "crashed"))
    pipeline.add(ClientResult(1, 1), torch.tensor([3.0, 0.0]))
    assert [c for c, _ in seen] == [4, 1] and [c.client_id for c in pipeline.clients] == [4, 1]
    assert torch.equal(seen[0][1], torch.tensor([2.0, 4.0]))
    assert [(f.client_id, f.reason) for f in pipeline.failures] == [
        (2, "update has NaN or Inf values"),
        (9, "crashed"),
    ]
    with pytest.raises(RejectedUpdate):
        check_finite(ClientResult(0, 1), torch.tensor([float("inf")]))


def test_running_mean_sums_in_arrival_order():
    """FedAvg's aggregate is ((n1 d1 + n2 d2) + n3 d3) / (n1 + n2 + n3), summed in cohort
    order one update at a time: bit for bit, not just approximately."""
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 1000, generator=gen)
    sizes = [7, 300, 41]
    x = torch.randn(1000, generator=gen)
    aggregator = FedAvg().start_round(x, 1, RowStore(3, 1000))
    for i, (n, d) in enumerate(zip(sizes, deltas)):
        aggregator.add(ClientResult(i, n), d)
    total = torch.zeros(1000)
    for n, d in zip(sizes, deltas):
        total.add_(d, alpha=float(n))
    assert torch.equal(aggregator.finish(), total / sum(sizes) + x)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_client_state_changes_only_when_the_round_finishes(storage, tmp_path):
    store = ClientStateStore(10, 3, storage, tmp_path / "s.bin")
    store.set(1, torch.ones(3))
    store.stage(1, torch.full((3,), 5.0))
    store.stage(4, torch.full((3,), 2.0))
    assert torch.equal(store.get(1), torch.ones(3)) and torch.equal(store.get(4), torch.zeros(3))
    assert store.state_dict().keys() == {1}
    store.discard()
    store.commit()
    assert torch.equal(store.get(1), torch.ones(3))
    store.stage(4, torch.full((3,), 2.0))
    store.commit()
    assert torch.equal(store.get(4), torch.full((3,), 2.0))
    assert store.state_dict().keys() == {1, 4}


def test_an_unfinished_scaffold_round_leaves_no_trace():
    """Updates of a round that never finishes (Ctrl-C during training) must not reach the
    control variates: the checkpoint written on interrupt holds the last finished round."""
    s = Scaffold()
    s.bind(context(num_clients=4))
    x = torch.zeros(2)
    first = s.start_round(x, 1, RowStore(2, 2))
    first.add(ClientResult(0, 5, metrics={"steps": 2}), torch.tensor([1.0, -1.0]))
    before = {k: v.clone() for k, v in s.store.state_dict().items()}
    assert before == {} and torch.equal(s.c, torch.zeros(2))  # nothing committed yet
    second = s.start_round(x, 1, RowStore(1, 2))  # the round is run again after resuming
    second.add(ClientResult(2, 5, metrics={"steps": 2}), torch.tensor([0.5, 0.5]))
    second.finish()
    assert set(s.store.state_dict()) == {2}  # client 0's staged c_i was discarded


def test_a_plug_in_strategy_gives_the_same_model_with_rows_or_streaming(tmp_path):
    """tests/plugins.py: HalfStepFedAvg implements aggregate over rows, HalfStepStreaming
    the same rule with a running sum (the README's two forms)."""
    vectors = {}
    for name in ("HalfStepFedAvg", "HalfStepStreaming"):
        cfg = compose_config([*FAST, f"strategy._target_=tests.plugins.{name}"])
        orch = build(cfg, tmp_path / name)
        orch.run()
        vectors[name] = orch.global_vector
    assert torch.allclose(vectors["HalfStepFedAvg"], vectors["HalfStepStreaming"], atol=1e-6)


def test_secure_sum_block_by_block_with_dropouts():
    """Masks are expanded, added and removed in blocks; with small blocks (several per
    update) the streamed sum still equals the plain sum of the survivors' inputs, and a
    cohort member that never submits (its training failed) is recovered like a drop-out."""
    from dataclasses import replace

    from fedtorch.privacy import secagg

    agg = secagg.SecureAggregation(
        enabled=True, value_range=1.0, bits=40, threshold=0.5, graph="complete"
    )  # six clients: the sparse graph is sized for no drop-out at 10%
    agg.protocol = replace(agg.protocol, block=704)
    gen = torch.Generator().manual_seed(3)
    updates = torch.rand(6, 2500, generator=gen) * 2 - 1
    cohort = [2, 5, 8, 9, 13, 21]
    masking = agg.start_round(cohort, 4, 2500)
    assert masking.clients[2].block == 704
    for c, row in zip(cohort, updates):
        if c != 9:  # client 9 failed during training
            masking.submit(c, row)
    total = masking.unmask()
    kept = [i for i, c in enumerate(cohort) if c != 9]
    step = agg.value_range * len(cohort) / (2 ** (agg.bits - 1) - 1)
    assert (total - updates[kept].double().sum(0)).abs().max() <= len(cohort) * step
