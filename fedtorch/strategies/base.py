"""The strategy interface: how the server configures a round and turns client results into
a new global model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtorch.results import ClientTask, RoundResults
from fedtorch.strategies.rows import RowStore
from fedtorch.strategies.streaming import Aggregator, RowCollector


@dataclass
class RunContext:
    """Facts about the run a strategy may need, given once before training (:meth:`bind`).

    Attributes:
        num_clients: N, clients in the federation.
        clients_per_round: clients sampled per round (before drop-outs).
        size: P, length of the flat ``mean``-key vector.
        param_mask: [P] bool, True where the flat vector holds trainable parameters (not
            buffers such as BatchNorm running statistics).
        optimizer: the local optimizer class and its default hyperparameters
            (``{"lr": ..., "momentum": ...}``), for rules that depend on them.
        prox_mu: the configured ``client.prox_mu``.
        run_dir: the run folder (strategies that spill per-client state to disk use it).
    """

    num_clients: int
    clients_per_round: int
    size: int
    param_mask: torch.Tensor
    optimizer: type
    optimizer_defaults: dict = field(default_factory=dict)
    prox_mu: float = 0.0
    run_dir: Path | None = None

    @classmethod
    def of(
        cls, trainer: Any, layout: Any, num_clients: int, clients_per_round: int, run_dir: Path
    ) -> RunContext:
        """The context of a run whose clients train with ``trainer`` (its model's
        parameters, local optimizer and ``prox_mu``) over ``layout``'s flat vector."""
        optimizer = trainer.local_optimizer
        params = [n for n, _ in trainer.model.named_parameters()]
        return cls(
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            size=layout.size,
            param_mask=layout.mask(params),
            optimizer=type(optimizer),
            optimizer_defaults=dict(optimizer.defaults),
            prox_mu=trainer.prox_mu,
            run_dir=run_dir,
        )


class Strategy:
    """Base class of aggregation strategies.

    A strategy sees only flat tensors: the global ``mean``-rule values [P] and the round's
    client deltas [P] with their sample counts (see :mod:`fedtorch.state.layout`). It takes a
    round's updates in one of two forms:

    * streaming: :meth:`start_round` returns an :class:`~fedtorch.strategies.streaming.
      Aggregator` that receives each client's delta as the client finishes, in cohort
      order, and keeps running sums (every mean-based rule: memory independent of the
      number of clients a round);
    * rows: :meth:`aggregate` receives the round's [K, P] delta matrix at once (rules
      that compare updates, and the simplest way to write a plug-in strategy). This is the
      default: a subclass that only implements :meth:`aggregate` gets every row, kept in
      memory or spilled to the run folder past ``aggregation.memory_budget_mb``.

    A streaming strategy's :meth:`aggregate` streams the matrix's rows through its own
    :meth:`start_round`, so both forms always agree. Strategies with client-side terms
    (SCAFFOLD, FedDyn) also override :meth:`configure`; stateful ones (server optimisers,
    control variates) keep their state on ``self`` and change it only in
    :meth:`Aggregator.finish`, so an interrupted round leaves no trace.

    A plug-in strategy is a subclass selected with ``strategy._target_=pkg.MyStrategy``.

    Attributes:
        extra_vectors: ``(down, up)``: full [P] vectors a client receives / sends besides
            the model (SCAFFOLD: its control variates), for the byte counts.
    """

    extra_vectors: tuple[int, int] = (0, 0)

    def bind(self, context: RunContext) -> None:
        """Check the run suits the strategy and size its state; raise ConfigError if not.

        Called once before training starts.
        """

    def configure(self, cohort: Sequence[int], round_idx: int) -> list[ClientTask]:
        """The round's tasks, one per sampled client in cohort order (default: plain)."""
        return [ClientTask(client_id=int(c)) for c in cohort]

    def start_round(
        self, global_vector: torch.Tensor, round_idx: int, rows: RowStore
    ) -> Aggregator:
        """The aggregator of this round's updates.

        ``rows`` is an empty store the round's updates fit in; the default keeps every row
        there and calls :meth:`aggregate` over them when the round finishes.
        """
        if type(self).aggregate is Strategy.aggregate:
            raise NotImplementedError(
                f"{type(self).__name__} must implement aggregate() or start_round()"
            )

        def finish(clients, store: RowStore) -> torch.Tensor:
            return self.aggregate(global_vector, RoundResults(clients, store.matrix()), round_idx)

        return RowCollector(rows, finish)

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        """The new global vector from the round's [K, P] deltas (``results.deltas``).

        Streaming strategies need not implement it: the rows are fed through
        :meth:`start_round` one by one.
        """
        aggregator = self.start_round(global_vector, round_idx, RowStore.of(results.deltas))
        for client, delta in zip(results.clients, results.deltas):
            aggregator.add(client, delta)
        return aggregator.finish()

    def state_dict(self) -> dict:
        """Everything the next round depends on (tensors, numbers, dicts), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
