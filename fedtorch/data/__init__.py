"""Data: loading datasets into memory, partitioning them across clients, batching."""

from fedtorch.data.datasets import DataBundle

__all__ = ["DataBundle"]
