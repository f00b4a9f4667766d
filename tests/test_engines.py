"""Engines: the vectorized engine reproduces the sequential one; unsupported models fail clearly."""

from __future__ import annotations

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from tests.conftest import FAST, compose_config

# Unequal client sizes (Dirichlet), several epochs, momentum and weight decay: exercises the
# padded last batches, frozen finished clients and optimizer state.
HETEROGENEOUS = [
    "rounds=2",
    "data.num_train=1999",
    "partition=dirichlet",
    "client.epochs=2",
]
SGD_MOMENTUM = ["client.optimizer.momentum=0.9", "client.optimizer.weight_decay=0.01"]


def final_vector(tmp_path, engine, extra=()):
    cfg = compose_config([*FAST, *HETEROGENEOUS, f"engine={engine}", *extra])
    orch = build(cfg, tmp_path / engine)
    summary = orch.run()
    return orch.global_vector, summary


@pytest.mark.parametrize(
    "extra",
    [
        SGD_MOMENTUM,
        [*SGD_MOMENTUM, "engine.cohort_size=2"],  # several cohorts per round
        ["client=adam", "client.steps=7", "client.optimizer.lr=0.01"],  # fixed steps, Adam
        ["clients_per_round=3", "client.batch_size=64"],
        [*SGD_MOMENTUM, "strategy=fedprox", "client.prox_mu=0.5"],  # FedProx term
        [*SGD_MOMENTUM, "strategy=scaffold"],  # control variates after the step
        [*SGD_MOMENTUM, "strategy=scaffold", "strategy.correction=gradient"],
        [*SGD_MOMENTUM, "strategy=feddyn", "strategy.alpha=0.1"],  # prox + linear term
        # per-client local steps (FedNova's case), drop-outs, label-flipping clients
        [*SGD_MOMENTUM, "strategy=fednova", "system.work=uniform_steps", "system.high=9"],
        ["attack=label_flip", "attack.fraction=0.4", "system.dropout=0.3"],
        ["strategy=qfedavg", "strategy.q=2.0"],  # initial losses from both engines
    ],
)
def test_vectorized_matches_sequential(tmp_path, extra):
    extra_seq = [e for e in extra if not e.startswith("engine.")]
    seq, seq_summary = final_vector(tmp_path, "sequential", extra_seq)
    vec, vec_summary = final_vector(tmp_path, "vectorized", extra)
    assert torch.allclose(seq, vec, atol=1e-5, rtol=1e-4), (seq - vec).abs().max()
    assert abs(seq_summary["final_accuracy"] - vec_summary["final_accuracy"]) <= 0.01


def test_vectorized_refuses_batchnorm(tmp_path):
    cfg = compose_config([*FAST, "engine=vectorized", "model._target_=tests.test_training.BNNet"])
    with pytest.raises(ConfigError, match="engine=sequential"):
        build(cfg, tmp_path / "bn")  # before training


def test_auto_cohort_size_follows_budget(tmp_path):
    cfg = compose_config([*FAST, "engine=vectorized", "engine.memory_budget_mb=1"])
    small = build(cfg, tmp_path / "a")
    cfg = compose_config([*FAST, "engine=vectorized", "engine.memory_budget_mb=1000"])
    large = build(cfg, tmp_path / "b")
    assert (
        1
        <= small.engine.auto_cohort_size(small.trainer)
        < large.engine.auto_cohort_size(large.trainer)
    )
