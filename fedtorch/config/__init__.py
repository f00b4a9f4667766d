"""From a Hydra config to a ready run: every ``instantiate`` call, checks, error lines.

* :mod:`~fedtorch.config.build`: ``build(cfg, run_dir)`` in ordered ``_setup_*`` steps.
* :mod:`~fedtorch.config.validate`: checks of values before anything is built.
* :mod:`~fedtorch.config.hydra_errors`: Hydra's composition errors as one line.

The top floor below the entry points: may import every room; no room imports it.
"""
