"""User-facing errors.

Every mistake a user can make (a bad config value, missing data files) is raised as a
:class:`FedtorchError` subclass whose message is one readable line. The command-line entry
point prints that line without a traceback; set ``FEDTORCH_FULL_ERROR=1`` (or
``HYDRA_FULL_ERROR=1``) to see the traceback as well. A feature whose optional dependency
is missing says which extra installs it (:func:`require`).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class FedtorchError(Exception):
    """Base class of errors caused by the user's input rather than by a bug."""


class ConfigError(FedtorchError):
    """A config key holds a value that is not allowed.

    The message names the key, what it holds and what is allowed, e.g.
    ``partition.alpha=-1: must be > 0``.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(FedtorchError):
    """Data files are missing, corrupt, or inconsistent with the config."""


def require(module: str, key: str, feature: str, extra: str = "llm") -> ModuleType:
    """``import module``, or a one-line ConfigError on ``key``: ``feature`` needs it, and
    ``pip install "fedtorch[extra]"`` brings it. Every room may call it, so it lives here."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            key, f'{feature} needs {module}: pip install "fedtorch[{extra}]" ({exc})'
        ) from exc
