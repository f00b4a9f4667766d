"""SCAFFOLD, FedNova, FedDyn: one round of each update rule against a hand computation,
the client-side terms in local training, and the checks made before training."""

from __future__ import annotations

import pytest
import torch

from fedtorch.client.trainer import ClientTrainer
from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult, ClientTask, RoundResults, resolve
from fedtorch.state.client_store import ClientStateStore
from fedtorch.state.layout import StateLayout
from fedtorch.strategies import FedDyn, FedNova, RunContext, Scaffold
from fedtorch.strategies.fednova import local_normalizer


def context(size=2, num_clients=4, optimizer=torch.optim.SGD, **defaults) -> RunContext:
    return RunContext(
        num_clients=num_clients,
        clients_per_round=2,
        size=size,
        param_mask=torch.ones(size, dtype=torch.bool),
        optimizer=optimizer,
        optimizer_defaults={"lr": 0.1, "momentum": 0.0, **defaults},
    )


def results(ids, deltas, sizes, steps) -> RoundResults:
    clients = [
        ClientResult(c, n, metrics={"steps": s}) for c, n, s in zip(ids, sizes, steps, strict=True)
    ]
    return RoundResults(clients, torch.tensor(deltas))


def test_scaffold_round_by_hand():
    s = Scaffold(server_lr=1.0)
    s.bind(context(num_clients=4))  # lr 0.1
    # Round 1: c = c_i = 0, so no correction yet.
    tasks = s.configure([0, 2], 1)
    assert [t.client_id for t in tasks] == [0, 2]
    assert all(torch.equal(resolve(t.step_correction), torch.zeros(2)) for t in tasks)
    x = torch.tensor([1.0, 1.0])
    r1 = results([0, 2], [[-0.4, 0.2], [0.2, 0.0]], [10, 30], [2, 4])
    x1 = s.aggregate(x, r1, 1)
    # x <- x + mean(delta) (uniform): [1 - 0.1, 1 + 0.1]
    assert torch.allclose(x1, torch.tensor([0.9, 1.1]))
    # c_0+ = 0 - 0 - [-0.4, 0.2] / (2 * 0.1) = [2, -1];  c_2+ = -[0.2, 0] / 0.4 = [-0.5, 0]
    assert torch.allclose(s.store.get(0), torch.tensor([2.0, -1.0]))
    assert torch.allclose(s.store.get(2), torch.tensor([-0.5, 0.0]))
    # c <- 0 + (|S|/N) mean(dc) = (1/4)([2,-1] + [-0.5,0]) = [0.375, -0.25]
    assert torch.allclose(s.c, torch.tensor([0.375, -0.25]))
    # Round 2: client 0's correction is c - c_0, client 1 (never sampled) gets c - 0.
    t0, t1 = s.configure([0, 1], 2)
    assert torch.allclose(resolve(t0.step_correction), torch.tensor([0.375 - 2.0, -0.25 + 1.0]))
    assert torch.allclose(resolve(t1.step_correction), torch.tensor([0.375, -0.25]))
    # c_1+ = 0 - c - [0.1, 0.1] / (1 * 0.1) = [-1.375, -0.75]
    s.aggregate(x1, results([1], [[0.1, 0.1]], [5], [1]), 2)
    assert torch.allclose(s.store.get(1), torch.tensor([-1.375, -0.75]))
    assert torch.allclose(s.c, torch.tensor([0.375 - 1.375 / 4, -0.25 - 0.75 / 4]))


def test_fednova_normalizer_matches_momentum_recursion():
    # a_i = total displacement of heavy-ball SGD with unit gradients and lr 1.
    for rho in (0.0, 0.5, 0.9):
        for steps in (1, 3, 10):
            buf, moved = 0.0, 0.0
            for _ in range(steps):
                buf = rho * buf + 1.0
                moved += buf
            assert local_normalizer(steps, rho) == pytest.approx(moved)


def test_fednova_round_by_hand():
    s = FedNova()
    s.bind(context())  # plain SGD: a_i = steps
    x = torch.tensor([0.0, 0.0])
    r = results([0, 1], [[2.0, 4.0], [3.0, -3.0]], [1, 3], [2, 6])
    # p = [1/4, 3/4]; d = [[1, 2], [0.5, -0.5]]; tau = 1/4*2 + 3/4*6 = 5
    # x <- 5 * (1/4 [1, 2] + 3/4 [0.5, -0.5]) = 5 * [0.625, 0.125] = [3.125, 0.625]
    assert torch.allclose(s.aggregate(x, r, 1), torch.tensor([3.125, 0.625]))
    # Equal steps and plain SGD: FedNova is FedAvg.
    r = results([0, 1], [[2.0, 4.0], [3.0, -3.0]], [1, 3], [4, 4])
    assert torch.allclose(s.aggregate(x, r, 1), torch.tensor([2.75, -1.25]))


def test_feddyn_round_by_hand():
    s = FedDyn(alpha=0.5)
    s.bind(context(num_clients=4))
    tasks = s.configure([0, 1], 1)
    assert all(
        t.prox_mu == 0.5 and torch.equal(resolve(t.correction), torch.zeros(2)) for t in tasks
    )
    x = torch.tensor([1.0, 2.0])
    r = results([0, 1], [[2.0, 0.0], [0.0, -4.0]], [1, 1], [1, 1])
    x1 = s.aggregate(x, r, 1)
    # g_0 = -0.5 [2, 0] = [-1, 0]; g_1 = [0, 2]; h = -(0.5/4)([2, -4]) = [-0.25, 0.5]
    # x1 = mean(w_k) - h / alpha = [2, 0] - [-0.5, 1] = [2.5, -1]
    assert torch.allclose(s.store.get(0), torch.tensor([-1.0, 0.0]))
    assert torch.allclose(s.store.get(1), torch.tensor([0.0, 2.0]))
    assert torch.allclose(s.h, torch.tensor([-0.25, 0.5]))
    assert torch.allclose(x1, torch.tensor([2.5, -1.0]))
    # Round 2: client 0's correction is -g_0.
    assert torch.allclose(resolve(s.configure([0], 2)[0].correction), torch.tensor([1.0, 0.0]))


def test_correction_and_prox_terms_in_local_training():
    """Two local SGD steps with grad + mu (w - w_t) + correction, by hand (SCAFFOLD/FedDyn)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    layout = StateLayout(model.state_dict())
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    lr, mu = 0.1, 0.3
    trainer = ClientTrainer(
        model, layout, x, y, lambda p: torch.optim.SGD(p, lr=lr), steps=2, batch_size=4
    )
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    vector = layout.flatten(w_t)
    correction = torch.linspace(-1, 1, layout.size)
    corr_w, corr_b = correction[:6].view(2, 3), correction[6:]
    batches, sizes = trainer.schedule(0, torch.arange(8), 1)
    w, b = w_t["weight"].clone(), w_t["bias"].clone()
    for row, size in zip(batches, sizes):
        idx = row[:size]
        flipped = 1 - y[idx]  # label flipping with C = 2
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x[idx] @ wg.T + bg, flipped)
        gw, gb = torch.autograd.grad(loss, (wg, bg))
        w = w - lr * (gw + mu * (w - w_t["weight"]) + corr_w)
        b = b - lr * (gb + mu * (b - w_t["bias"]) + corr_b)
    delta = torch.empty_like(vector)
    task = ClientTask(0, correction=correction, prox_mu=mu, flip_labels=True)
    trainer.train(task, torch.arange(8), w_t, vector, 1, delta)
    assert torch.allclose(delta, torch.cat([w.reshape(-1), b]) - vector, atol=1e-6)


def test_step_correction_is_applied_outside_momentum():
    """SCAFFOLD's default: momentum SGD on g alone, then w <- w - lr * (c - c_i)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    layout = StateLayout(model.state_dict())
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    lr, rho = 0.1, 0.9
    trainer = ClientTrainer(
        model,
        layout,
        x,
        y,
        lambda p: torch.optim.SGD(p, lr=lr, momentum=rho),
        steps=3,
        batch_size=4,
    )
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    vector = layout.flatten(w_t)
    v = torch.linspace(-2, 2, layout.size)
    v_w, v_b = v[:6].view(2, 3), v[6:]
    batches, sizes = trainer.schedule(0, torch.arange(12), 1)
    w, b = w_t["weight"].clone(), w_t["bias"].clone()
    buf_w = buf_b = None
    for row, size in zip(batches, sizes):
        idx = row[:size]
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x[idx] @ wg.T + bg, y[idx])
        gw, gb = torch.autograd.grad(loss, (wg, bg))
        buf_w = gw if buf_w is None else rho * buf_w + gw
        buf_b = gb if buf_b is None else rho * buf_b + gb
        w = w - lr * buf_w - lr * v_w
        b = b - lr * buf_b - lr * v_b
    delta = torch.empty_like(vector)
    trainer.train(ClientTask(0, step_correction=v), torch.arange(12), w_t, vector, 1, delta)
    assert torch.allclose(delta, torch.cat([w.reshape(-1), b]) - vector, atol=1e-6)


def test_bind_refuses_unsuitable_runs():
    with pytest.raises(ConfigError, match="^client.optimizer:.*SGD"):
        FedNova().bind(context(optimizer=torch.optim.Adam))
    with pytest.raises(ConfigError, match="^client.optimizer:.*nesterov"):
        FedNova().bind(context(nesterov=True, momentum=0.9))
    with pytest.raises(ConfigError, match="^strategy.client_state:"):
        Scaffold(client_state="gpu").bind(context())
    with pytest.raises(ConfigError, match="^strategy.alpha:"):
        FedDyn(alpha=0)
    with pytest.raises(ConfigError, match="^strategy.correction:"):
        Scaffold(correction="both")


def test_client_state_store_on_disk(tmp_path):
    store = ClientStateStore(1000, 50_000, "disk", tmp_path / "c.bin")
    assert torch.equal(store.get(7), torch.zeros(50_000))
    store.set(7, torch.arange(50_000.0))
    assert torch.equal(store.get(7), torch.arange(50_000.0))
    # 1000 x 50k floats = 200 MB declared; only the written row takes disk blocks.
    assert (tmp_path / "c.bin").stat().st_size == 1000 * 50_000 * 4
    assert (tmp_path / "c.bin").stat().st_blocks * 512 < 10 * 2**20
    assert list(store.state_dict()) == [7]
    store.load_state_dict({2: torch.ones(50_000)})  # a resume: exactly these rows
    assert list(store.state_dict()) == [2]
    assert torch.equal(store.get(7), torch.zeros(50_000))
    assert torch.equal(store.get(2), torch.ones(50_000))
    assert (tmp_path / "c.bin").stat().st_blocks * 512 < 10 * 2**20  # still sparse
    memory = ClientStateStore(1000, 4)
    memory.load_state_dict({3: torch.ones(4)})
    assert torch.equal(memory.get(3), torch.ones(4)) and memory.state_dict().keys() == {3}


def test_disk_client_state_in_a_run_matches_memory(tmp_path):
    from fedtorch.config.build import build
    from tests.conftest import FAST, compose_config

    runs = {}
    for storage in ("memory", "disk"):
        cfg = compose_config([*FAST, "strategy=scaffold", f"strategy.client_state={storage}"])
        orch = build(cfg, tmp_path / storage)
        orch.run()
        runs[storage] = orch.global_vector
    assert torch.equal(runs["memory"], runs["disk"])
    assert (tmp_path / "disk" / "client_state" / "scaffold_ci.bin").exists()


def test_qfedavg_round_by_hand():
    from fedtorch.strategies import QFedAvg

    x = torch.tensor([1.0, 1.0])
    r = results([0, 1], [[0.1, 0.0], [0.0, -0.2]], [5, 5], [1, 1])
    r.clients[0].metrics["initial_loss"] = 2.0
    r.clients[1].metrics["initial_loss"] = 0.5
    s = QFedAvg(q=1.0)
    s.bind(context())  # lr 0.1 -> L = 10
    assert all(t.initial_loss for t in s.configure([0, 1], 1))
    # Delta w = -L delta = [[-1, 0], [0, 2]]; Delta_k = F_k Delta w_k = [[-2, 0], [0, 1]]
    # h_k = q ||Delta w_k||^2 + L F_k = [1 + 20, 4 + 5] = [21, 9]
    # x <- x - ([-2, 1]) / 30
    assert torch.allclose(s.aggregate(x, r, 1), torch.tensor([1 + 2 / 30, 1 - 1 / 30]))
    uniform = QFedAvg(q=0.0)
    uniform.bind(context())
    assert torch.allclose(uniform.aggregate(x, r, 1), x + torch.tensor([0.05, -0.1]))


def test_initial_loss_is_the_global_models_loss_on_the_client():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    layout = StateLayout(model.state_dict())
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    trainer = ClientTrainer(model, layout, x, y, torch.optim.SGD, steps=2, batch_size=4)
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    expected = torch.nn.functional.cross_entropy(x @ w_t["weight"].T + w_t["bias"], y).item()
    vector = layout.flatten(w_t)
    result = trainer.train(
        ClientTask(0, initial_loss=True), torch.arange(10), w_t, vector, 1, torch.empty_like(vector)
    )
    assert result.metrics["initial_loss"] == pytest.approx(expected, rel=1e-5)


def test_qfedavg_stays_finite_for_zero_losses_and_large_q():
    from fedtorch.strategies.qfedavg import LOSS_FLOOR, qfedavg_step

    x = torch.tensor([1.0, 1.0])
    deltas = torch.tensor([[0.1, 0.0], [0.0, -0.2]])
    # A client the model already fits exactly: F = 0 is floored, so with q = 0 the step is
    # still uniform FedAvg (the 0 * F^(q-1) term must not become 0 * inf = NaN).
    zero = torch.tensor([0.0, 0.5])
    assert torch.allclose(qfedavg_step(x, deltas, zero, 0.0, 10.0), x + deltas.mean(0))
    # q = 0.5: by hand with F_0 = LOSS_FLOOR (Delta w = [[-1, 0], [0, 2]], L = 10).
    f = torch.tensor([LOSS_FLOOR, 0.5], dtype=torch.float64)
    dw = torch.tensor([[-1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    num = (f.sqrt()[:, None] * dw).sum(0)
    h = (0.5 * f.pow(-0.5) * dw.pow(2).sum(1) + 10 * f.sqrt()).sum()
    step = qfedavg_step(x, deltas, zero, 0.5, 10.0)
    assert torch.isfinite(step).all()
    assert torch.allclose(step, x - (num / h).float())
    # q = 40 with small losses: F^q underflows float32 (1e-80); the step must not be 0 / 0.
    small = torch.tensor([0.01, 0.02])
    step = qfedavg_step(x, deltas, small, 40.0, 10.0)
    f = small.double()
    num = (f.pow(40)[:, None] * dw).sum(0)
    h = (40 * f.pow(39) * dw.pow(2).sum(1) + 10 * f.pow(40)).sum()
    assert torch.isfinite(step).all()
    assert torch.allclose(step, x - (num / h).float())
    # Every loss zero: the floor makes the curvature term dominate and the step vanish.
    assert torch.allclose(qfedavg_step(x, deltas, torch.zeros(2), 1.0, 10.0), x, atol=1e-9)
