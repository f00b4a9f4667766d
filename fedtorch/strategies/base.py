"""The strategy interface: how the server turns client results into a new global model."""

from __future__ import annotations

import torch

from fedtorch.results import RoundResults


class Strategy:
    """Base class of aggregation strategies.

    A strategy sees only flat tensors: the global ``mean``-rule values [P] and the round's
    client deltas [K, P] with their sample counts (see :mod:`fedtorch.state`). It returns
    the new global vector. Subclasses
    implement :meth:`aggregate`; stateful strategies (server optimisers) keep their state on
    ``self``.

    A plug-in strategy is a subclass selected with ``strategy._target_=pkg.MyStrategy``.
    """

    def aggregate(
        self, global_vector: torch.Tensor, results: RoundResults, round_idx: int
    ) -> torch.Tensor:
        raise NotImplementedError
