"""Data: loading datasets into memory, partitioning them across clients, batching.

Holds datasets and their tasks (:mod:`~fedtorch.data.tasks`: what a label means, the loss
and accuracy per sample), partitions, DataLoaders and silos.

May import only the leaves; every room above may import it.
"""

from fedtorch.data.datasets import DataBundle

__all__ = ["DataBundle"]
