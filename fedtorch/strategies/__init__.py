"""Aggregation strategies. Pure math lives in :mod:`fedtorch.strategies.aggregate`."""

from fedtorch.strategies.base import Strategy
from fedtorch.strategies.fedavg import FedAvg

__all__ = ["FedAvg", "Strategy"]
