"""The update pipeline: what happens to each client's update between the engine and the
aggregate (see :mod:`fedtorch.pipeline.pipeline`).

May import the leaves and :mod:`fedtorch.strategies` (the aggregator it feeds).
"""
