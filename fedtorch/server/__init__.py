"""The server's side: the round loop and what it keeps between rounds.

* :mod:`~fedtorch.server.orchestrator`: :class:`Orchestrator`, the round loop.
* :mod:`~fedtorch.server.round_pipeline`: a round's update pipeline assembled from the
  components (attack, compression, privacy, aggregator).
* :mod:`~fedtorch.server.traffic`: bytes sent each way, counted from what was encoded.
* :mod:`~fedtorch.server.sampling`: which clients train in a round.
* :mod:`~fedtorch.server.evaluation`: test metrics of the global model (pooled, per
  client, per silo, shared across ranks).
* :mod:`~fedtorch.server.checkpoint` and :mod:`~fedtorch.server.resume`: checkpoint
  files and the run state saved in and restored from them.
* :mod:`~fedtorch.server.summary`: ``summary.json``.

May import every room below it (engines, client, privacy, compression, pipeline,
strategies, data, models, logging, the leaves); never :mod:`fedtorch.config`.
"""
