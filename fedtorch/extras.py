"""Optional dependencies: import one, or stop with a line naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from fedtorch.errors import ConfigError


def require(module: str, key: str, feature: str, extra: str = "llm") -> ModuleType:
    """``import module``, or a one-line ConfigError on ``key``: ``feature`` needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            key, f'{feature} needs {module}: pip install "fedtorch[{extra}]" ({exc})'
        ) from exc
