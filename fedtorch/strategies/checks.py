"""Range checks of strategy hyperparameters: one ConfigError line naming the key."""

from __future__ import annotations

from fedtorch.errors import ConfigError


def check_number(
    key: str, value: float, low: float, high: float | None = None, *, open_low: bool = False
) -> None:
    """ConfigError on ``strategy.KEY`` unless ``low <= value < high`` (``low < value`` when
    ``open_low``; no upper bound when ``high`` is None)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (value > low if open_low else value >= low)
    if high is not None:
        ok = ok and value < high
    if not ok:
        lower = f"> {low}" if open_low else f">= {low}"
        allowed = f"{lower} and < {high}" if high is not None else lower
        raise ConfigError(f"strategy.{key}", f"must be {allowed}, got {value!r}")


def check_int(key: str, value: int, low: int) -> None:
    """ConfigError on ``strategy.KEY`` unless ``value`` is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"strategy.{key}", f"must be an integer >= {low}, got {value!r}")
