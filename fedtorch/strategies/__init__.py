"""Aggregation strategies. Pure math lives in :mod:`fedtorch.strategies.aggregate`."""

from fedtorch.strategies.base import Strategy
from fedtorch.strategies.fedavg import FedAvg
from fedtorch.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "Strategy"]
