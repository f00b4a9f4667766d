"""The update pipeline: what happens to each client's update between the engine and the
aggregate (see :mod:`fedtorch.pipeline.pipeline`)."""
