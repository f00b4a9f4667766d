"""One-line errors for mistakes Hydra itself catches (unknown option or key, bad override
syntax, an output folder that cannot be created, a sweeper or launcher whose plugin is
not installed).

Hydra reports these with several lines and a hint about HYDRA_FULL_ERROR. Before handing
the command line to Hydra, :func:`precheck` composes the config the same way and turns
those failures into :class:`~fedtorch.errors.ConfigError` lines naming the key. With
``-m``/``--multirun`` it composes the overrides that are not sweeps (``seed=0,1`` and
Optuna's ``interval(...)`` are left out). Command lines it does not model (``--cfg``,
``--config-dir``, ...) go to Hydra unchecked, and any failure it does not recognise is
left for Hydra to report.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from omegaconf import OmegaConf

from fedtorch.errors import ConfigError

_MISSING_OPTION = re.compile(r"Could not find '([^']+)/([^']+)'")
_NOT_OVERRIDABLE = re.compile(r"Could not override '([^']+)'")
_MULTIRUN = ("-m", "--multirun")
# Groups whose options come from Hydra plugins, installed with fedtorch's `sweep` extra.
_PLUGIN_GROUPS = ("hydra/sweeper", "hydra/launcher")
# Groups whose options put their keys elsewhere (their `# @package`): "" is the top level.
_GROUP_PACKAGES = {"dataset": "data", "experiment": ""}
_PLUGIN_HINT = 'Optuna sweeper, joblib and submitit launchers: pip install "fedtorch[sweep]"'


def precheck(argv: Sequence[str]) -> None:
    """Raise ConfigError if Hydra would reject ``argv`` (overrides of a single run, or
    the fixed overrides of a multirun)."""
    multirun = any(arg in _MULTIRUN for arg in argv)
    overrides = [arg for arg in argv if arg not in _MULTIRUN]
    if any(arg.startswith("-") for arg in overrides):
        return
    if multirun:
        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except OverrideParseException:
            return  # Hydra's own message names the bad override
        overrides = [arg for arg, o in zip(overrides, parsed) if not o.is_sweep_override()]
    try:
        with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as exc:
        raise _missing_option(exc) from exc
    except OverrideParseException as exc:
        detail = str(exc).splitlines()[0]
        raise ConfigError("override", f"cannot parse the command line: {detail}") from exc
    except ConfigCompositionException as exc:
        raise _composition(exc) from exc
    except Exception:
        return  # not one of ours: let Hydra report it
    key = "hydra.sweep.dir" if multirun or cfg.hydra.mode == RunMode.MULTIRUN else "hydra.run.dir"
    run_dir = Path(str(OmegaConf.select(cfg, key)))
    problem = _unwritable(run_dir)
    if problem:
        raise ConfigError(key, f"cannot create the output folder {run_dir}: {problem}")


def _missing_option(exc: MissingConfigException) -> ConfigError:
    text = str(exc)
    match = _MISSING_OPTION.search(text)
    if not match:
        return ConfigError("config", text.splitlines()[0])
    group, option = match.groups()
    options = getattr(exc, "options", None)
    if options is None:  # the message lists them, then the search path
        listed = text.split("Available options", 1)[-1].split("Config search path", 1)[0]
        options = [line.strip() for line in listed.splitlines()[1:] if line.startswith("\t")]
    choices = f"; choose from {', '.join(options)}" if options else ""
    if group in _PLUGIN_GROUPS:
        choices += f" ({_PLUGIN_HINT})"
    return ConfigError(group, f"no option {option!r}{choices}")


def _composition(exc: ConfigCompositionException) -> ConfigError:
    text = str(exc)
    match = _NOT_OVERRIDABLE.search(text)
    if match and "not in struct" in str(exc.__cause__):
        key = match.group(1)
        moved = _group_package(key)
        if moved is not None:
            return ConfigError(key, f"no such key: {moved}")
        return ConfigError(key, f"no such key (check the spelling; +{key}=VALUE adds a new one)")
    if match:
        return ConfigError(match.group(1), text.splitlines()[-1].strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "... raised while composing config:" + why
        return ConfigError("config", f"{lines[0]} {lines[1]}")
    return ConfigError("config", lines[0] if lines else text)


def _group_package(key: str) -> str | None:
    """Where the keys of a group named by ``key`` live, when not under the group's name
    (``dataset``'s under ``data.``, a preset's at the top), as advice; else None."""
    group, _, rest = key.partition(".")
    if group not in _GROUP_PACKAGES or not rest:
        return None
    package = _GROUP_PACKAGES[group]
    if package:
        return (
            f"the {group} group's keys are under {package}. (set {package}.{rest}=VALUE; "
            f"pick an option with {group}=NAME)"
        )
    return f"a preset's keys are top-level keys (set {rest}=VALUE)"


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be created or written, or None."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
