"""Server optimizers: two rounds against hand computations (so the moment state is checked)."""

from __future__ import annotations

import math

import pytest
import torch

from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult, RoundResults
from fedtorch.strategies import FedAdagrad, FedAdam, FedAvgM, FedYogi


def results(deltas: list[list[float]], sizes: list[int]) -> RoundResults:
    clients = [ClientResult(i, n) for i, n in enumerate(sizes)]
    return RoundResults(clients, torch.tensor(deltas))


# Two clients, weights 1 and 3. Round 1 average delta: (1*[4,-8] + 3*[0,0]) / 4 = [1,-2];
# round 2: (1*[2,2] + 3*[2,2]) / 4 = [2, 2].
ROUND1 = results([[4.0, -8.0], [0.0, 0.0]], [1, 3])
ROUND2 = results([[2.0, 2.0], [2.0, 2.0]], [1, 3])
X0 = torch.tensor([0.5, 0.5])


def test_fedavgm_two_rounds():
    s = FedAvgM(server_lr=0.5, momentum=0.9)
    x1 = s.aggregate(X0, ROUND1, 1)  # b=[1,-2]; x = 0.5 + 0.5*b = [1.0, -0.5]
    assert torch.allclose(x1, torch.tensor([1.0, -0.5]))
    x2 = s.aggregate(x1, ROUND2, 2)  # b = 0.9*[1,-2] + [2,2] = [2.9, 0.2]; x = x1 + 0.5*b
    assert torch.allclose(x2, torch.tensor([2.45, -0.4]))


def adaptive_by_hand(kind, lr, b1, b2, tau):
    """Scalar re-derivation of Reddi et al. Algorithm 2, coordinate by coordinate."""
    xs = []
    for coord in range(2):
        x, m, v = X0[coord].item(), 0.0, tau**2
        for delta in (([1.0, -2.0])[coord], ([2.0, 2.0])[coord]):
            m = b1 * m + (1 - b1) * delta
            sq = delta * delta
            if kind == "adagrad":
                v = v + sq
            elif kind == "adam":
                v = b2 * v + (1 - b2) * sq
            else:
                v = v - (1 - b2) * sq * math.copysign(1.0, v - sq) if v != sq else v
            x = x + lr * m / (math.sqrt(v) + tau)
        xs.append(x)
    return torch.tensor(xs)


@pytest.mark.parametrize(
    ("cls", "kind", "kwargs"),
    [
        (FedAdagrad, "adagrad", {"server_lr": 0.1, "beta1": 0.0, "tau": 1e-3}),
        (FedAdagrad, "adagrad", {"server_lr": 0.1, "beta1": 0.5, "tau": 1e-2}),
        (FedAdam, "adam", {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        (FedYogi, "yogi", {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    ],
)
def test_adaptive_two_rounds(cls, kind, kwargs):
    s = cls(**kwargs)
    x2 = s.aggregate(s.aggregate(X0, ROUND1, 1), ROUND2, 2)
    expected = adaptive_by_hand(
        kind, kwargs["server_lr"], kwargs["beta1"], kwargs.get("beta2", 0.0), kwargs["tau"]
    )
    assert torch.allclose(x2, expected, atol=1e-6), (x2, expected)


def test_fedadam_first_step_by_hand():
    """Round 1 of FedAdam written out: m = 0.1*Δ, v = 0.99*τ² + 0.01*Δ²."""
    s = FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x1 = s.aggregate(X0, ROUND1, 1)
    delta = torch.tensor([1.0, -2.0])
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    assert torch.allclose(x1, X0 + 0.01 * m / (v.sqrt() + 1e-3))
    assert torch.allclose(s.m, m) and torch.allclose(s.v, v)


def test_yogi_second_moment_moves_towards_delta_squared():
    s = FedYogi(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    s.aggregate(X0, ROUND1, 1)
    # v0 = τ² < Δ² = [1, 4]: sign(v - Δ²) = -1, v grows by 0.01*Δ².
    assert torch.allclose(s.v, 1e-6 + 0.01 * torch.tensor([1.0, 4.0]))


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (FedAdam, {"tau": 0.0}, "strategy.tau"),
        (FedAdam, {"beta1": 1.0}, "strategy.beta1"),
        (FedYogi, {"server_lr": -1.0}, "strategy.server_lr"),
        (FedAvgM, {"momentum": 1.5}, "strategy.momentum"),
    ],
)
def test_bad_hyperparameters_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        cls(**kwargs)
