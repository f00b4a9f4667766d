"""Server-optimizer strategies: FedAvg's average delta, then a server step.

See :mod:`fedtorch.strategies.server_optimizers` for the update rules. The optimizer state
(momentum buffer, or m and v) lives on the strategy and is returned by ``state_dict`` so
that a checkpoint can restore it.
"""

from __future__ import annotations

import torch

from fedtorch.strategies.checks import check_number as _check
from fedtorch.strategies.fedavg import FedAvg
from fedtorch.strategies.server_optimizers import adaptive_step, momentum_step


class _ServerOptimizer(FedAvg):
    """FedAvg's average delta (weighted by samples, or uniformly), then a server step."""

    def __init__(self, server_lr: float, weighted: bool = True) -> None:
        super().__init__(weighted)
        _check("server_lr", server_lr, 0.0, open_low=True)
        self.server_lr = server_lr


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): b ← β b + Δ; x ← x + η b."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, weighted: bool = True):
        super().__init__(server_lr, weighted)
        _check("momentum", momentum, 0.0, 1.0)
        self.momentum = momentum
        self.buffer: torch.Tensor | None = None

    def server_step(
        self, global_vector: torch.Tensor, delta: torch.Tensor, round_idx: int
    ) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.zeros_like(delta)
        self.buffer = self.buffer.to(delta.device)
        new, self.buffer = momentum_step(
            global_vector, delta, self.buffer, self.server_lr, self.momentum
        )
        return new

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Restore the buffer (moved to the aggregation device at the next round)."""
        self.buffer = state["buffer"]


class _Adaptive(_ServerOptimizer):
    kind = ""

    def __init__(
        self,
        server_lr: float,
        beta1: float,
        beta2: float,
        tau: float,
        weighted: bool,
    ) -> None:
        super().__init__(server_lr, weighted)
        _check("beta1", beta1, 0.0, 1.0)
        _check("beta2", beta2, 0.0, 1.0)
        _check("tau", tau, 0.0, open_low=True)  # tau > 0 bounds the step size
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def server_step(
        self, global_vector: torch.Tensor, delta: torch.Tensor, round_idx: int
    ) -> torch.Tensor:
        if self.m is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.full_like(delta, self.tau**2)
        self.m, self.v = self.m.to(delta.device), self.v.to(delta.device)
        new, self.m, self.v = adaptive_step(
            self.kind,
            global_vector,
            delta,
            self.m,
            self.v,
            self.server_lr,
            self.beta1,
            self.beta2,
            self.tau,
        )
        return new

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.m, self.v = state["m"], state["v"]


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021): v ← v + Δ²; x ← x + η m / (√v + τ)."""

    kind = "adagrad"

    def __init__(self, server_lr=0.1, beta1=0.0, tau=1e-3, weighted=True):
        super().__init__(server_lr, beta1, 0.0, tau, weighted)


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021): v ← β2 v + (1-β2) Δ²; x ← x + η m / (√v + τ)."""

    kind = "adam"

    def __init__(self, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3, weighted=True):
        super().__init__(server_lr, beta1, beta2, tau, weighted)


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021): v ← v − (1-β2) Δ² sign(v − Δ²); x ← x + η m / (√v + τ)."""

    kind = "yogi"

    def __init__(self, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3, weighted=True):
        super().__init__(server_lr, beta1, beta2, tau, weighted)
