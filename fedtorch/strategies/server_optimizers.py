"""Server optimizer steps as pure functions over flat tensors.

"FedAvg, then a server step" (Reddi et al. 2021, "Adaptive Federated Optimization"): the
server treats the negative averaged client delta as a pseudo-gradient. With Δ_t the
(weighted) average delta of round t, all vectors of shape [P]:

    FedAvgM (Hsu et al. 2019):  b_t = β b_{t-1} + Δ_t;         x_{t+1} = x_t + η b_t
    FedAdagrad:  m_t = β1 m_{t-1} + (1-β1) Δ_t;  v_t = v_{t-1} + Δ_t²
    FedAdam:     m_t as above;  v_t = β2 v_{t-1} + (1-β2) Δ_t²
    FedYogi:     m_t as above;  v_t = v_{t-1} - (1-β2) Δ_t² sign(v_{t-1} - Δ_t²)
    adaptive update:  x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

As in the paper's Algorithm 2, m starts at 0 and v at τ² (v_{-1} ≥ τ²), without bias
correction.
"""

from __future__ import annotations

import torch

ADAPTIVE_KINDS = ("adagrad", "adam", "yogi")


def momentum_step(
    x: torch.Tensor, delta: torch.Tensor, buffer: torch.Tensor, lr: float, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvgM: returns (new x, new momentum buffer)."""
    buffer = momentum * buffer + delta
    return x + lr * buffer, buffer


def adaptive_step(
    kind: str,
    x: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedAdagrad / FedAdam / FedYogi: returns (new x, new m, new v)."""
    if kind not in ADAPTIVE_KINDS:
        raise ValueError(f"kind must be one of {ADAPTIVE_KINDS}, got {kind!r}")
    m = beta1 * m + (1 - beta1) * delta
    sq = delta * delta
    if kind == "adagrad":
        v = v + sq
    elif kind == "adam":
        v = beta2 * v + (1 - beta2) * sq
    else:
        v = v - (1 - beta2) * sq * torch.sign(v - sq)
    return x + lr * m / (v.sqrt() + tau), m, v
