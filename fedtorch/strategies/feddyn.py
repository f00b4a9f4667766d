"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization").

Each client k keeps the gradient state g_k (zero at the start); the server keeps h. In
round t, with theta the global model, P the sampled clients and N all clients:

    client objective:  L_k(w) - <g_k, w> + alpha/2 ||w - theta||^2
                       (gradient: grad L_k(w) - g_k + alpha (w - theta))
    client state:      g_k <- g_k - alpha (w_k - theta)
    server state:      h <- h - (alpha / N) sum_{k in P} (w_k - theta)
    global model:      theta <- mean_{k in P} w_k - h / alpha

Clients train with ``prox_mu = alpha`` and ``correction = -g_k`` (:class:`ClientTask`), so
both engines run it. g_k and h cover trainable parameters only; buffers are averaged.
The g_k live in a :class:`~fedtorch.client_state.ClientStateStore` (CPU or disk).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch.client_state import ClientStateStore
from fedtorch.results import ClientTask, RoundResults
from fedtorch.strategies.base import RunContext
from fedtorch.strategies.checks import check_number
from fedtorch.strategies.fedavg import FedAvg


class FedDyn(FedAvg):
    """Dynamic regularisation.

    Args:
        alpha: regulariser weight (the paper uses 0.01-0.1).
        client_state: where the g_k live: ``memory`` (CPU) or ``disk``.
    """

    def __init__(self, alpha: float = 0.01, client_state: str = "memory") -> None:
        super().__init__(weighted=False)
        check_number("alpha", alpha, 0.0, open_low=True)
        self.alpha = alpha
        self.client_state = client_state
        self.h: torch.Tensor | None = None

    def bind(self, context: RunContext) -> None:
        self.num_clients = context.num_clients
        self.mask = context.param_mask.float()
        self.h = torch.zeros(context.size)
        self.store = ClientStateStore.for_run(context, self.client_state, "feddyn_grad")

    def configure(self, cohort: Sequence[int], round_idx: int) -> list[ClientTask]:
        return [
            ClientTask(client_id=int(c), prox_mu=self.alpha, correction=-self.store.get(int(c)))
            for c in cohort
        ]

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        delta_sum = torch.zeros_like(self.h)
        for row, client in enumerate(results.clients):
            delta = results.deltas[row].detach().to("cpu", torch.float32) * self.mask
            self.store.set(client.client_id, self.store.get(client.client_id) - self.alpha * delta)
            delta_sum += delta
        self.h -= self.alpha / self.num_clients * delta_sum
        correction = (self.h / self.alpha).to(global_vector.device, global_vector.dtype)
        return global_vector + self.average_delta(results) - correction

    def state_dict(self) -> dict:
        return {"h": self.h, "grad_k": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.h = state["h"].clone()
        self.store.load_state_dict(state["grad_k"])
