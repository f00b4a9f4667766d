"""Engines decide how a round's clients execute (one after another, batched, distributed)."""

from fedtorch.engines.sequential import SequentialEngine

__all__ = ["SequentialEngine"]
