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
The g_k live in a :class:`~fedtorch.state.client_store.ClientStateStore` (CPU or disk); each
client's new g_k is staged as its update arrives and committed when the round finishes.
The round's running sum of deltas gives both the uniform mean and the h update (the
parameter mask only zeroes coordinates, so sum_k mask * d_k = mask * sum_k d_k exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from fedtorch.results import ClientResult, ClientTask
from fedtorch.state.client_store import ClientStateStore
from fedtorch.strategies.base import RunContext
from fedtorch.strategies.checks import check_number
from fedtorch.strategies.fedavg import FedAvg, MeanAggregator
from fedtorch.strategies.rows import RowStore


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
            ClientTask(
                client_id=int(c), prox_mu=self.alpha, correction=partial(self._correction, int(c))
            )
            for c in cohort
        ]

    def _correction(self, client_id: int) -> torch.Tensor:
        """-g_k for one client."""
        return -self.store.get(client_id)

    def start_round(
        self, global_vector: torch.Tensor, round_idx: int, rows: RowStore
    ) -> _FedDynRound:
        self.store.discard()
        return _FedDynRound(self, global_vector, round_idx)

    def state_dict(self) -> dict:
        return {"h": self.h, "grad_k": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.h = state["h"].clone()
        self.store.load_state_dict(state["grad_k"])


class _FedDynRound(MeanAggregator):
    """The uniform mean of the deltas; each client's g_k <- g_k - alpha * delta staged."""

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        super().add(client, delta)
        s = self.strategy
        g_k = s.store.get(client.client_id)
        g_k.addcmul_(delta.detach().to("cpu", torch.float32), s.mask, value=-s.alpha)
        s.store.stage(client.client_id, g_k)

    def finish(self) -> torch.Tensor:
        s = self.strategy
        delta_sum = self.mean.total.to("cpu", torch.float32)
        s.h.addcmul_(delta_sum, s.mask, value=-s.alpha / s.num_clients)
        correction = (s.h / s.alpha).to(self.global_vector.device, self.global_vector.dtype)
        new = self.mean.mean().add_(self.global_vector).sub_(correction)
        s.store.commit()
        return new
