"""System heterogeneity, attacks and FedBN in whole runs."""

from __future__ import annotations

import json

import pytest
import torch

from fedtorch.client.attacks import Attack
from fedtorch.client.heterogeneity import SystemHeterogeneity
from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult, ClientTask, RoundResults
from tests.conftest import FAST, compose_config


def tasks(n):
    return [ClientTask(c) for c in range(n)]


def test_local_work_is_drawn_per_client_and_round_and_repeats():
    system = SystemHeterogeneity(work="uniform_steps", low=2, high=5, seed=3)
    kept, dropped = system.apply(tasks(50), 1, [100] * 50, 10)
    steps = [t.steps for t in kept]
    assert not dropped and set(steps) == {2, 3, 4, 5}
    again, _ = system.apply(tasks(50), 1, [100] * 50, 10)
    assert [t.steps for t in again] == steps
    later, _ = system.apply(tasks(50), 2, [100] * 50, 10)
    assert [t.steps for t in later] != steps
    epochs = SystemHeterogeneity(work="uniform_epochs", low=2, high=2)
    kept, _ = epochs.apply(tasks(2), 1, [95, 10], 10)
    assert [t.steps for t in kept] == [20, 2]  # 2 epochs of ceil(n / B) batches


def test_dropout_rate_and_bad_values():
    system = SystemHeterogeneity(dropout=0.3, seed=0)
    dropped = sum(len(system.apply(tasks(100), r, [10] * 100, 10)[1]) for r in range(1, 21))
    assert 0.25 < dropped / 2000 < 0.35
    with pytest.raises(ConfigError, match="^system.dropout:"):
        SystemHeterogeneity(dropout=1.0)
    with pytest.raises(ConfigError, match="^system.low:"):
        SystemHeterogeneity(work="uniform_steps", low=5, high=2)
    with pytest.raises(ConfigError, match="^system.work:"):
        SystemHeterogeneity(work="pareto")


def test_update_attacks_rewrite_only_malicious_rows():
    attack = Attack("sign_flip", fraction=0.5, scale=2.0, num_clients=4, seed=0)
    assert len(attack.malicious) == 2
    deltas = torch.ones(4, 3)
    results = RoundResults([ClientResult(c, 1) for c in range(4)], deltas)
    assert attack.corrupt(results, 1) == 2
    for c in range(4):
        expected = -2.0 if c in attack.malicious else 1.0
        assert torch.equal(deltas[c], torch.full((3,), expected))
    noisy = Attack("gaussian", fraction=0.25, std=3.0, num_clients=4, seed=0)
    deltas = torch.zeros(4, 10_000)
    noisy.corrupt(RoundResults([ClientResult(c, 1) for c in range(4)], deltas), 1)
    (bad,) = noisy.malicious
    assert deltas[bad].std() == pytest.approx(3.0, rel=0.05)
    assert deltas.count_nonzero(dim=1).tolist().count(0) == 3  # honest rows untouched
    flips = Attack("label_flip", fraction=0.5, num_clients=4, seed=0)
    ts = tasks(4)
    flips.prepare(ts)
    assert {t.client_id for t in ts if t.flip_labels} == flips.malicious
    with pytest.raises(ConfigError, match="^attack.fraction:"):
        Attack("scaled", fraction=1.5)


def test_dropouts_and_attacks_are_logged(tmp_path):
    cfg = compose_config(
        [
            *FAST,
            "rounds=4",
            "system.dropout=0.5",
            "min_clients=0",
            "attack=sign_flip",
            "attack.fraction=0.4",
        ]
    )
    orch = build(cfg, tmp_path)
    orch.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients"] + r["dropped"] == 5 for r in rows)
    assert any(r["dropped"] for r in rows) and all("malicious" in r for r in rows)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("round,clients,dropped,failed,malicious,")


def test_round_without_clients_keeps_the_model(tmp_path):
    cfg = compose_config([*FAST, "rounds=1", "system.dropout=0.999999", "min_clients=0"])
    orch = build(cfg, tmp_path)
    before = orch.global_vector.clone()
    orch.run()
    assert torch.equal(orch.global_vector, before)


def test_fedbn_keeps_every_batchnorm_key_local(tmp_path):
    cfg = compose_config([*FAST, "model._target_=tests.test_training.BNNet", "strategy=fedbn"])
    orch = build(cfg, tmp_path)
    local = set(orch.layout.keys("local"))
    assert local == {
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    initial = {k: orch.global_state[k].clone() for k in local}
    orch.run()
    assert all(torch.equal(orch.global_state[k], initial[k]) for k in local)
    assert len(orch.trainer.local_state) == 5  # each client kept its own BatchNorm


@pytest.mark.parametrize(
    "strategy", ["scaffold", "feddyn", "fednova", "median", "trimmed_mean", "qfedavg"]
)
def test_every_new_strategy_trains(tmp_path, strategy):
    cfg = compose_config([*FAST, f"strategy={strategy}", "rounds=3"])
    summary = build(cfg, tmp_path).run()
    # q-FedAvg's steps are shorter (h_k grows with q ||Delta w||^2): it learns more slowly.
    assert summary["final_accuracy"] > (0.3 if strategy == "qfedavg" else 0.5)


def test_scaffold_counts_its_control_variates_in_traffic(tmp_path):
    plain = build(compose_config([*FAST, "rounds=1"]), tmp_path / "a").run()
    scaffold = build(compose_config([*FAST, "rounds=1", "strategy=scaffold"]), tmp_path / "b")
    summary = scaffold.run()
    assert summary["bytes_up"] == 2 * plain["bytes_up"]
    assert summary["bytes_down"] == 2 * plain["bytes_down"]


def test_robust_strategy_bounds_fail_before_training(tmp_path):
    cfg = compose_config([*FAST, "strategy=bulyan"])  # 5 clients < 4f + 3 = 7
    with pytest.raises(ConfigError, match="^strategy.num_byzantine:"):
        build(cfg, tmp_path)
