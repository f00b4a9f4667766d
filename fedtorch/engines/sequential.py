"""Sequential engine: clients train one after another on one reusable model instance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from fedtorch.client.trainer import ClientTrainer
from fedtorch.errors import FedtorchError
from fedtorch.pipeline.pipeline import UpdateSink
from fedtorch.results import ClientFailure, ClientTask


def reusable_buffer(current: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, P] buffer for deltas, reused across rounds when it fits ``like`` [P]."""
    fits = (
        current is not None
        and current.shape[0] >= rows
        and current.shape[-1] == like.numel()
        and current.device == like.device
        and current.dtype == like.dtype
    )
    if fits:
        return current
    return torch.empty(rows, like.numel(), dtype=like.dtype, device=like.device)


class SequentialEngine:
    """Run each sampled client's local training in turn.

    Each client's delta is written into one reusable [P] buffer and handed to the update
    pipeline as soon as the client finishes, so the engine holds one update at a time.

    Args:
        verbose: show a per-client progress bar inside each round.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._buffer: torch.Tensor | None = None

    def run(
        self,
        trainer: ClientTrainer,
        tasks: Sequence[ClientTask],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
        sink: UpdateSink,
    ) -> None:
        """Run ``tasks`` in the given order, handing each result to ``sink``.

        A client whose training raises is reported with ``sink.fail`` and left out.
        """
        self._buffer = reusable_buffer(self._buffer, 1, global_vector)
        delta = self._buffer[0]
        todo = tasks
        if self.verbose:
            todo = tqdm(tasks, desc=f"round {round_idx} clients", leave=False)
        for task in todo:
            try:
                result = trainer.train(
                    task, shards[task.client_id], global_state, global_vector, round_idx, delta
                )
            except FedtorchError:
                raise
            except Exception as exc:  # a client's crash must not end the round
                sink.fail(ClientFailure(task.client_id, f"{type(exc).__name__}: {exc}"))
                continue
            sink.add(result, delta)
