"""Sequential engine: clients train one after another on one reusable model instance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from fedtorch.client import ClientTrainer
from fedtorch.results import ClientTask, RoundResults


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
        """Run ``tasks`` in the given order; row i of the deltas is ``tasks[i]``'s client."""
        self._deltas = delta_buffer(self._deltas, len(tasks), global_vector)
        deltas = self._deltas[: len(tasks)]
        todo = tasks
        if self.verbose:
            todo = tqdm(tasks, desc=f"round {round_idx} clients", leave=False)
        clients = [
            trainer.train(
                task, shards[task.client_id], global_state, global_vector, round_idx, deltas[i]
            )
            for i, task in enumerate(todo)
        ]
        return RoundResults(clients=clients, deltas=deltas)
