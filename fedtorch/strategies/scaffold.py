"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"), with the paper's option II control-variate update.

Server control variate c and client control variates c_i (all [P], zero at the start).
In round t, for each sampled client i in S, with K_i its local steps and eta_l its local
learning rate:

    local step:   y <- y - eta_l (g_i(y) - c_i + c)        (correction c - c_i)
    option II:    c_i+ = c_i - c + (x - y_i) / (K_i eta_l) = c_i - c - Delta y_i / (K_i eta_l)
    server:       x <- x + eta_g * mean_{i in S} Delta y_i
                  c <- c + (|S| / N) * mean_{i in S} (c_i+ - c_i)

With momentum (NIID-Bench uses 0.9) the paper's rule is ambiguous. By default
(``correction: step``) the optimizer takes its momentum step on g_i alone and the
correction is applied after it, y <- y - eta_l (c - c_i), as NIID-Bench's implementation
does; then c_i, estimated from the momentum trajectory, is in the same units as the step.
``correction: gradient`` adds c - c_i to the gradient instead, which momentum amplifies
by 1/(1 - rho) on top of c_i's own 1/(1 - rho): it diverges on NIID-Bench's setting.
With plain SGD the two are identical.

Control variates cover trainable parameters only (buffers keep c = 0). The c_i are kept
per client in a :class:`~fedtorch.state.client_store.ClientStateStore` (CPU memory, or a
memory-mapped file in the run folder with ``client_state=disk``), never on the device.
Each client downloads c and uploads c_i+ - c_i besides the model: twice FedAvg's traffic.

Streaming: a round keeps two running sums [P] (the deltas' mean and sum_i (c_i+ - c_i));
each client's c_i+ is staged in the store as its update arrives and committed when the
round finishes. A task's correction c - c_i is computed when the client starts training,
so a round's tasks hold no [K, P] block.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult, ClientTask
from fedtorch.state.client_store import ClientStateStore
from fedtorch.strategies.base import RunContext
from fedtorch.strategies.checks import check_number
from fedtorch.strategies.fedavg import FedAvg, MeanAggregator
from fedtorch.strategies.rows import RowStore


def control_variate_update(
    c_i: torch.Tensor, c: torch.Tensor, delta: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Option II: c_i+ = c_i - c - delta / (steps * lr), with delta = y_i - x."""
    return c_i - c - delta / (steps * lr)


class Scaffold(FedAvg):
    """SCAFFOLD with option II control variates.

    Args:
        server_lr: global step size eta_g (1 recovers FedAvg's averaging of models).
        weighted: average the deltas by sample count instead of uniformly (the paper
            averages uniformly).
        client_state: where the c_i live: ``memory`` (CPU) or ``disk``.
        correction: ``step`` (after the optimizer step) or ``gradient`` (added to it).
    """

    extra_vectors = (1, 1)

    def __init__(
        self,
        server_lr: float = 1.0,
        weighted: bool = False,
        client_state: str = "memory",
        correction: str = "step",
    ) -> None:
        super().__init__(weighted)
        check_number("server_lr", server_lr, 0.0, open_low=True)
        if correction not in ("step", "gradient"):
            raise ConfigError(
                "strategy.correction", f"must be step or gradient, got {correction!r}"
            )
        self.correction = correction
        self.server_lr = server_lr
        self.client_state = client_state
        self.c: torch.Tensor | None = None

    def bind(self, context: RunContext) -> None:
        lr = context.optimizer_defaults.get("lr")
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ConfigError("client.optimizer.lr", "SCAFFOLD needs a positive local lr")
        self.local_lr = float(lr)
        self.num_clients = context.num_clients
        self.mask = context.param_mask.float()
        self.c = torch.zeros(context.size)
        self.store = ClientStateStore.for_run(context, self.client_state, "scaffold_ci")

    def configure(self, cohort: Sequence[int], round_idx: int) -> list[ClientTask]:
        field = "step_correction" if self.correction == "step" else "correction"
        return [
            ClientTask(client_id=int(c), **{field: partial(self._correction, int(c))})
            for c in cohort
        ]

    def _correction(self, client_id: int) -> torch.Tensor:
        """c - c_i for one client."""
        return self.store.get(client_id).neg_().add_(self.c)

    def start_round(
        self, global_vector: torch.Tensor, round_idx: int, rows: RowStore
    ) -> _ScaffoldRound:
        self.store.discard()
        return _ScaffoldRound(self, global_vector, round_idx)

    def server_step(
        self, global_vector: torch.Tensor, mean_delta: torch.Tensor, round_idx: int
    ) -> torch.Tensor:
        return mean_delta.mul_(self.server_lr).add_(global_vector)

    def state_dict(self) -> dict:
        return {"c": self.c, "c_i": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.c = state["c"].clone()
        self.store.load_state_dict(state["c_i"])


class _ScaffoldRound(MeanAggregator):
    """The mean delta, plus sum_i (c_i+ - c_i); each c_i+ staged as it is computed."""

    def __init__(self, strategy: Scaffold, global_vector: torch.Tensor, round_idx: int) -> None:
        super().__init__(strategy, global_vector, round_idx)
        self.delta_c_sum = torch.zeros_like(strategy.c)

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        super().add(client, delta)
        s = self.strategy
        # c_i+ - c_i = mask * (-c - delta / (K_i lr)), since c_i is zero off the mask; worked
        # in place so a client costs two [P] temporaries (the difference and c_i).
        steps = int(client.metrics["steps"])
        change = delta.detach().to("cpu", torch.float32).mul(-1.0 / (steps * s.local_lr))
        change.sub_(s.c).mul_(s.mask)
        self.delta_c_sum += change
        s.store.stage(client.client_id, change.add_(s.store.get(client.client_id)))

    def finish(self) -> torch.Tensor:
        new = super().finish()
        s = self.strategy
        s.c += self.delta_c_sum / s.num_clients
        s.store.commit()
        return new
