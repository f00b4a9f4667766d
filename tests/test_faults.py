"""Client faults: a client that raises, sends NaN/Inf or a malformed state is dropped from
the round, logged with its id and reason, and counted; ``on_client_failure=raise`` and
``min_clients`` stop the run with a message instead."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import open_dict

from fedtorch.client.trainer import ClientTrainer
from fedtorch.config.build import build
from fedtorch.errors import FedtorchError
from tests.conftest import FAST, compose_config


class FaultyTrainer(ClientTrainer):
    """Fails in a chosen way for chosen clients: ``faults`` maps client id -> kind."""

    def __init__(self, *args, faults=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = {int(k): v for k, v in (faults or {}).items()}
        self._current = None

    def train(self, task, *args, **kwargs):
        self._current = task.client_id
        if self.faults.get(task.client_id) == "raise":
            raise RuntimeError("device lost")
        return super().train(task, *args, **kwargs)

    def local_state_dict(self):
        state = dict(super().local_state_dict())
        kind = self.faults.get(self._current)
        name = next(iter(state))
        if kind == "nan":
            state[name] = torch.full_like(state[name], float("nan"))
        elif kind == "inf":
            state[name] = torch.full_like(state[name], float("inf"))
        elif kind == "missing":
            del state[name]
        elif kind == "extra":
            state["ghost.weight"] = torch.zeros(1)
        elif kind == "shape":
            state[name] = state[name].reshape(-1)[:3]
        return state


FAULTS = {0: "raise", 1: "nan", 2: "missing", 3: "shape", 4: "extra"}
REASONS = {
    0: "RuntimeError: device lost",
    1: "NaN or Inf",
    2: "missing",
    3: "wrong shape",
    4: "unexpected ghost.weight",
}


def faulty_config(faults, extra=(), clients=7):
    cfg = compose_config([*FAST, "rounds=2", f"num_clients={clients}", *extra])
    with open_dict(cfg):
        cfg.client._target_ = "tests.test_faults.FaultyTrainer"
        cfg.client.faults = {str(k): v for k, v in faults.items()}
    return cfg


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_faulty_clients_are_dropped_logged_and_counted(tmp_path, caplog, engine):
    if engine == "sequential":
        faults = FAULTS
        orch = build(faulty_config(faults), tmp_path)
    else:  # the vectorized engine trains without the trainer's hooks: poison the data
        faults = {1: "nan", 5: "nan"}
        orch = build(faulty_config({}, ["engine=vectorized"]), tmp_path)
        for client in faults:
            orch.data.train_x[orch.shards[client][0]] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fedtorch"):
        summary = orch.run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["failed"] for r in rows] == [len(faults)] * 2
    assert [r["clients"] for r in rows] == [7 - len(faults)] * 2
    assert torch.isfinite(orch.global_vector).all() and summary["final_accuracy"] > 0.3
    for client, kind in faults.items():
        reason = REASONS[client] if engine == "sequential" else "NaN or Inf"
        assert any(
            f"client {client} failed" in m and reason in m and "dropped" in m
            for m in caplog.messages
        ), (kind, caplog.messages)


def test_failures_match_a_run_without_those_clients(tmp_path):
    """Dropping the failed clients aggregates exactly the others."""
    faulty = build(faulty_config({2: "raise"}, ["rounds=1"]), tmp_path / "a")
    faulty.run()
    clean = build(faulty_config({}, ["rounds=1"]), tmp_path / "b")
    tasks = [t for t in clean.strategy.configure(range(7), 1) if t.client_id != 2]
    pipeline = clean._start_pipeline(tasks, 1)
    clean.engine.run(
        clean.trainer, tasks, clean.shards, clean.global_state, clean.global_vector, 1, pipeline
    )
    expected = pipeline.finish()
    assert torch.equal(faulty.global_vector, expected)


def test_raise_policy_and_min_clients_stop_with_a_message(tmp_path):
    cfg = faulty_config({3: "nan"}, ["on_client_failure=raise"])
    with pytest.raises(FedtorchError, match="round 1: client 3 failed: .*NaN.*on_client_failure"):
        build(cfg, tmp_path / "a").run()
    cfg = faulty_config({c: "raise" for c in range(5)}, ["min_clients=3"])
    with pytest.raises(FedtorchError, match="round 1: only 2 of 7 .*5 failed.*min_clients=3"):
        build(cfg, tmp_path / "b").run()


def test_a_non_finite_server_step_stops_the_run_with_the_last_good_model(tmp_path):
    """Clients were finite but the server step overflowed (FedAdam with server_lr 1e39):
    the run stops with a message naming the round, and the global model is not replaced."""
    cfg = compose_config([*FAST, "rounds=2", "strategy=fedadam", "strategy.server_lr=1e39"])
    orch = build(cfg, tmp_path)
    before = orch.global_vector.clone()
    with pytest.raises(FedtorchError, match="round 1: the FedAdam server step gave non-finite"):
        orch.run()
    assert torch.equal(orch.global_vector, before)
