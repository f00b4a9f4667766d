"""Sequential engine: clients train one after another on one reusable model instance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from fedtorch.client import ClientTrainer
from fedtorch.results import ClientResult


class SequentialEngine:
    """Run each sampled client's local training in turn.

    Args:
        verbose: show a per-client progress bar inside each round.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def run(
        self,
        trainer: ClientTrainer,
        client_ids: Sequence[int],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
    ) -> list[ClientResult]:
        """Train ``client_ids`` (in the given order) and return their results."""
        ids = (
            tqdm(client_ids, desc=f"round {round_idx} clients", leave=False)
            if self.verbose
            else client_ids
        )
        return [
            trainer.train(int(cid), shards[int(cid)], global_state, global_vector, round_idx)
            for cid in ids
        ]
