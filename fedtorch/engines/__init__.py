"""Engines decide how a round's clients execute (one after another, batched, distributed).

Also :mod:`~fedtorch.engines.process_group`: the torch.distributed process group (start,
ranks, the start-up checks), and :mod:`~fedtorch.engines.messages`: what ranks send each
other (tensors and a typed, versioned header; the kinds and their schemas in one table).
May import the leaves, :mod:`fedtorch.client`, :mod:`fedtorch.pipeline`,
:mod:`fedtorch.strategies`, :mod:`fedtorch.data`.
"""

from fedtorch.engines.distributed import DistributedEngine
from fedtorch.engines.sequential import SequentialEngine
from fedtorch.engines.vectorized import VectorizedEngine

__all__ = ["DistributedEngine", "SequentialEngine", "VectorizedEngine"]
