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
    """FedAvgM: returns (new x, new momentum buffer).

    Works in place: ``buffer`` is updated and ``delta``'s storage holds the new x, so a
    server step of a large model allocates nothing.
    """
    buffer.mul_(momentum).add_(delta)
    return torch.mul(buffer, lr, out=delta).add_(x), buffer


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
    """FedAdagrad / FedAdam / FedYogi: returns (new x, new m, new v).

    Works in place: ``m`` and ``v`` are updated and ``delta``'s storage holds the new x
    (FedYogi needs one [P] temporary), so the step costs no copies of the model.
    """
    if kind not in ADAPTIVE_KINDS:
        raise ValueError(f"kind must be one of {ADAPTIVE_KINDS}, got {kind!r}")
    m.mul_(beta1).add_(delta, alpha=1 - beta1)
    sq = delta.mul_(delta)
    if kind == "adagrad":
        v.add_(sq)
    elif kind == "adam":
        v.mul_(beta2).add_(sq, alpha=1 - beta2)
    else:
        v.sub_(torch.sub(v, sq).sign_().mul_(sq), alpha=1 - beta2)
    denominator = torch.sqrt(v, out=sq).add_(tau)
    return torch.div(m, denominator, out=sq).mul_(lr).add_(x), m, v
