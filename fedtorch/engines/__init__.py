"""Engines decide how a round's clients execute (one after another, batched, distributed)."""

from fedtorch.engines.distributed import DistributedEngine
from fedtorch.engines.sequential import SequentialEngine
from fedtorch.engines.vectorized import VectorizedEngine

__all__ = ["DistributedEngine", "SequentialEngine", "VectorizedEngine"]
