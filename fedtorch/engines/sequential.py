"""Sequential engine: clients train one after another on one reusable model instance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from fedtorch.client import ClientTrainer
from fedtorch.errors import FedtorchError
from fedtorch.results import ClientFailure, ClientResult, ClientTask, RoundResults


def delta_buffer(current: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, P] buffer for a round's deltas, reused across rounds when it fits.

    Reusing it keeps memory flat however many rounds run: one round's deltas exist at a
    time, and no per-round stacking copy is made.
    """
    fits = (
        current is not None
        and current.shape[0] >= rows
        and current.shape[1] == like.numel()
        and current.device == like.device
        and current.dtype == like.dtype
    )
    return (
        current if fits else torch.empty(rows, like.numel(), dtype=like.dtype, device=like.device)
    )


def reject_nonfinite(
    clients: list[ClientResult], deltas: torch.Tensor, failures: list[ClientFailure]
) -> RoundResults:
    """Drop the clients whose delta row (row i = ``clients[i]``) has NaN or Inf.

    One check for the whole round, so the device is synchronised once, not per client.
    """
    finite = torch.isfinite(deltas).all(dim=1).tolist() if clients else []
    if all(finite):
        return RoundResults(clients, deltas, failures)
    failures = failures + [
        ClientFailure(c.client_id, "update has NaN or Inf values")
        for c, ok in zip(clients, finite)
        if not ok
    ]
    keep = [i for i, ok in enumerate(finite) if ok]
    rows = torch.tensor(keep, dtype=torch.long, device=deltas.device)
    return RoundResults([clients[i] for i in keep], deltas.index_select(0, rows), failures)


class SequentialEngine:
    """Run each sampled client's local training in turn.

    Args:
        verbose: show a per-client progress bar inside each round.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._deltas: torch.Tensor | None = None

    def run(
        self,
        trainer: ClientTrainer,
        tasks: Sequence[ClientTask],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
    ) -> RoundResults:
        """Run ``tasks`` in the given order.

        Row i of the deltas belongs to ``clients[i]`` of the result. A client whose training
        raises or whose update is not finite is left out and listed in ``failures``.
        """
        self._deltas = delta_buffer(self._deltas, len(tasks), global_vector)
        todo = tasks
        if self.verbose:
            todo = tqdm(tasks, desc=f"round {round_idx} clients", leave=False)
        clients: list[ClientResult] = []
        failures: list[ClientFailure] = []
        for task in todo:
            row = self._deltas[len(clients)]
            try:
                result = trainer.train(
                    task, shards[task.client_id], global_state, global_vector, round_idx, row
                )
            except FedtorchError:
                raise
            except Exception as exc:  # a client's crash must not end the round
                failures.append(ClientFailure(task.client_id, f"{type(exc).__name__}: {exc}"))
                continue
            clients.append(result)
        return reject_nonfinite(clients, self._deltas[: len(clients)], failures)
