"""Engines decide how a round's clients execute (one after another, batched, distributed)."""

from fedtorch.engines.sequential import SequentialEngine
from fedtorch.engines.vectorized import VectorizedEngine

__all__ = ["SequentialEngine", "VectorizedEngine"]
