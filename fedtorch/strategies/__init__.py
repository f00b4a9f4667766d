"""Aggregation strategies. Pure math lives in :mod:`fedtorch.strategies.aggregate`.

Also the aggregators that take a round's updates one at a time
(:mod:`~fedtorch.strategies.streaming`), the row store for rules that need every row
(:mod:`~fedtorch.strategies.rows`) and exact LoRA aggregation
(:mod:`~fedtorch.strategies.lora_exact`).

May import only the leaves.
"""

from fedtorch.strategies.base import RunContext, Strategy
from fedtorch.strategies.fedavg import FedAvg
from fedtorch.strategies.feddyn import FedDyn
from fedtorch.strategies.fednova import FedNova
from fedtorch.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtorch.strategies.qfedavg import QFedAvg
from fedtorch.strategies.robust import Bulyan, CoordinateMedian, Krum, TrimmedMean
from fedtorch.strategies.scaffold import Scaffold

__all__ = [
    "Bulyan",
    "CoordinateMedian",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedDyn",
    "FedNova",
    "FedYogi",
    "Krum",
    "QFedAvg",
    "RunContext",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
]


def averages_plainly(strategy: object) -> bool:
    """A FedAvg-family strategy that needs nothing but the average delta (what privacy,
    secure aggregation and exact LoRA aggregation can work with)."""
    return isinstance(strategy, FedAvg) and not isinstance(strategy, (FedDyn, Scaffold))
