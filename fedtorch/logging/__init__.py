"""What a run records: metric rows, plots, experiment trackers, run-folder files.

* :mod:`~fedtorch.logging.metrics`: ``metrics.csv``/``metrics.jsonl``, the progress bar,
  ``metrics.png``; :class:`MetricsLogger` fans rows out to the trackers.
* :mod:`~fedtorch.logging.trackers`: TensorBoard, MLflow, W&B.
* :mod:`~fedtorch.logging.files`: files written atomically.

May import only the leaves (:mod:`fedtorch.errors`, ...); the server imports it.
"""
