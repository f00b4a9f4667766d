"""The round loop: determinism, early stop, per-key rules in training, real data."""

from __future__ import annotations

import json

import pytest
import torch

from fedtorch.client.trainer import ClientTrainer
from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.results import ClientTask
from fedtorch.server.sampling import cohort_size, sample_clients
from fedtorch.train import train
from tests.conftest import FAST, FMNIST_DIR, compose_config


def run(tmp_path, overrides, name="run"):
    cfg = compose_config([*FAST, *overrides])
    summary = train(cfg, tmp_path / name)
    return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    _, a = run(tmp_path, ["seed=3", "clients_per_round=3"], "a")
    _, b = run(tmp_path, ["seed=3", "clients_per_round=3"], "b")
    _, c = run(tmp_path, ["seed=4", "clients_per_round=3"], "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_client_sampling_seeded_by_seed_and_round():
    assert sample_clients(100, 10, 0, 5) == sample_clients(100, 10, 0, 5)
    assert sample_clients(100, 10, 0, 5) != sample_clients(100, 10, 0, 6)
    assert len(set(sample_clients(100, 10, 0, 5))) == 10
    assert sample_clients(7, 7, 0, 1) == list(range(7))
    assert cohort_size(100, None, 0.1) == 10 and cohort_size(100, None, 0.001) == 1
    assert cohort_size(100, None, None) == 100
    with pytest.raises(ConfigError, match="^clients_per_round:"):
        cohort_size(10, 11, None)
    with pytest.raises(ConfigError, match="^fraction:"):
        cohort_size(10, None, 1.5)


def test_target_accuracy_stops_early(tmp_path):
    summary, _ = run(tmp_path, ["rounds=30", "target_accuracy=0.5"])
    assert summary["rounds_completed"] < 30
    assert summary["round_reached_target"] == summary["rounds_completed"]
    assert summary["best_accuracy"] >= 0.5


def test_eval_every_and_metrics_rows(tmp_path):
    run(tmp_path, ["rounds=5", "eval_every=2"])
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [("test_accuracy" in r) for r in rows] == [False, True, False, True, True]
    assert all(r["clients"] == 5 and r["train_loss"] > 0 for r in rows)


def test_local_steps_and_epochs():
    model = torch.nn.Linear(2, 2)
    from fedtorch.state.layout import StateLayout

    layout = StateLayout(model.state_dict())
    x, y = torch.randn(25, 2), torch.randint(0, 2, (25,))
    make = lambda **kw: ClientTrainer(model, layout, x, y, torch.optim.SGD, **kw)  # noqa: E731
    assert make(epochs=2, batch_size=10).num_steps(25) == 6
    assert make(steps=4, batch_size=10).num_steps(25) == 4
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make(steps=7, batch_size=10)
    vector = layout.flatten(state)
    delta = torch.empty_like(vector)
    result = trainer.train(ClientTask(0), torch.arange(25), state, vector, 1, delta)
    assert result.metrics["steps"] == 7
    assert "train_accuracy" not in result.metrics
    assert torch.allclose(delta, layout.flatten(model.state_dict()) - vector)
    with pytest.raises(ConfigError, match="^client.batch_size:"):
        make(batch_size=0)


class BNNet(torch.nn.Module):
    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(64, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x.flatten(1)))))


def test_batchnorm_counter_and_fedbn_local_keys(tmp_path):
    cfg = compose_config([*FAST, "model._target_=tests.test_training.BNNet", "rounds=2"])
    orch = build(cfg, tmp_path / "plain")
    orch.run()
    tracked = orch.global_state["bn.num_batches_tracked"]
    # 2000 samples / 5 clients = 400 each, batch 32 -> 13 steps a round; 2 rounds -> 26.
    assert tracked.dtype == torch.int64 and int(tracked) == 26

    cfg = compose_config(
        [
            *FAST,
            "model._target_=tests.test_training.BNNet",
            "rounds=2",
            "key_rules=[{pattern: '^bn\\.', rule: local}]",
        ]
    )
    orch = build(cfg, tmp_path / "fedbn")
    initial = {k: v.clone() for k, v in orch.global_state.items()}
    orch.run()
    assert torch.equal(orch.global_state["bn.weight"], initial["bn.weight"])  # never aggregated
    assert not torch.equal(orch.global_state["fc.weight"], initial["fc.weight"])
    per_client = orch.trainer.local_state
    assert set(per_client) == set(range(5))
    assert not torch.equal(per_client[0]["bn.running_mean"], per_client[1]["bn.running_mean"])


def test_model_output_mismatch_is_refused(tmp_path):
    cfg = compose_config([*FAST, "model._target_=tests.plugins.WrongOutputNet"])
    with pytest.raises(ConfigError, match=r"^model: outputs shape \[2, 3\]"):
        build(cfg, tmp_path / "r")


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
@pytest.mark.skipif(
    not FMNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_two_rounds(tmp_path):
    """NIID-Bench FedAvg on real Fashion-MNIST, Dir(0.5), 2 local epochs instead of 10 (a
    fifth of the cost): above 60% after 2 rounds."""
    cfg = compose_config(
        [
            "+experiment=fmnist_dirichlet",
            "rounds=2",
            "client.epochs=2",
            "logger=quiet",
            "device=cpu",
            f"data.search_paths=[{FMNIST_DIR}]",
            f"data.root={tmp_path / 'none'}",
            "data.download=false",
        ]
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["rounds_completed"] == 2
    assert summary["best_accuracy"] > 0.60, summary


def test_fedprox_local_update_by_hand():
    """Two local SGD steps with the proximal term: w <- w - lr (g(w) + mu (w - w_t))."""
    from fedtorch.state.layout import StateLayout

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    layout = StateLayout(model.state_dict())
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    lr, mu = 0.1, 0.5
    trainer = ClientTrainer(
        model,
        layout,
        x,
        y,
        lambda p: torch.optim.SGD(p, lr=lr),
        steps=2,
        batch_size=4,
        prox_mu=mu,
    )
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    batches, sizes = trainer.schedule(0, torch.arange(8), 1)

    w, b = w_t["weight"].clone(), w_t["bias"].clone()
    for row, size in zip(batches, sizes):
        idx = row[:size]
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x[idx] @ wg.T + bg, y[idx])
        gw, gb = torch.autograd.grad(loss, (wg, bg))
        w = w - lr * (gw + mu * (w - w_t["weight"]))
        b = b - lr * (gb + mu * (b - w_t["bias"]))

    vector = layout.flatten(w_t)
    delta = torch.empty_like(vector)
    trainer.train(ClientTask(0), torch.arange(8), w_t, vector, 1, delta)
    expected = torch.cat([w.reshape(-1), b]) - vector
    assert torch.allclose(delta, expected, atol=1e-6)
    # mu changes the result: the second step is pulled back towards w_t.
    plain = ClientTrainer(
        model, layout, x, y, lambda p: torch.optim.SGD(p, lr=lr), steps=2, batch_size=4
    )
    plain_delta = torch.empty_like(vector)
    plain.train(ClientTask(0), torch.arange(8), w_t, vector, 1, plain_delta)
    assert not torch.allclose(plain_delta, delta)
    with pytest.raises(ConfigError, match="^client.prox_mu:"):
        ClientTrainer(model, layout, x, y, torch.optim.SGD, prox_mu=-1.0)
