"""Sequential engine: clients train one after another on one reusable model instance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from fedtorch.client import ClientTrainer
from fedtorch.results import RoundResults


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
        client_ids: Sequence[int],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
    ) -> RoundResults:
        """Train ``client_ids`` (in the given order); row i of the deltas is client i's."""
        self._deltas = delta_buffer(self._deltas, len(client_ids), global_vector)
        deltas = self._deltas[: len(client_ids)]
        ids = client_ids
        if self.verbose:
            ids = tqdm(client_ids, desc=f"round {round_idx} clients", leave=False)
        clients = [
            trainer.train(int(c), shards[int(c)], global_state, global_vector, round_idx, deltas[i])
            for i, c in enumerate(ids)
        ]
        return RoundResults(clients=clients, deltas=deltas)
