"""The strategy interface: how the server turns client results into a new global model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch.results import ClientResult


class Strategy:
    """Base class of aggregation strategies.

    A strategy sees only flat vectors: the global ``mean``-rule values [P] and each client's
    delta [P] (see :mod:`fedtorch.state`). It returns the new global vector. Subclasses
    implement :meth:`aggregate`; stateful strategies (server optimisers) keep their state on
    ``self``.

    A plug-in strategy is a subclass selected with ``strategy._target_=pkg.MyStrategy``.
    """

    def aggregate(
        self, global_vector: torch.Tensor, results: Sequence[ClientResult], round_idx: int
    ) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def stack_deltas(results: Sequence[ClientResult], device: torch.device) -> torch.Tensor:
        """Client deltas as one [K, P] tensor on ``device``."""
        return torch.stack([r.delta.to(device, non_blocking=True) for r in results])
