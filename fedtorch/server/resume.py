"""What a checkpoint holds of a run, and how a run continues from one.

A checkpoint is everything the next round depends on: the global weights (frozen ``keep``
weights left out, as they are rebuilt identically, but for the base weights exact LoRA
aggregation folds each round), the global vector, each stateful component's
``state_dict`` (strategy, privacy, compression, client trainer), the clients' local keys,
the torch RNG, the loop's :class:`~fedtorch.server.progress.Progress` and the metric rows
logged so far. Resuming from it gives the same numbers as the uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fedtorch.errors import ConfigError, DataError
from fedtorch.server import checkpoint
from fedtorch.server.checkpoint import CheckpointSettings
from fedtorch.server.progress import Progress
from fedtorch.state.layout import StateLayout

log = logging.getLogger("fedtorch")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunCheckpoints:
    """The checkpoints and final model files of one run (see the module docstring).

    Args:
        run_dir: the run folder.
        settings: when to checkpoint, whether and from where to resume.
        layout: the state's layout (its rules say which weights are frozen).
        folded_keys: frozen base weights that exact LoRA aggregation changes (saved).
        components: the stateful components by checkpoint key (strategy, privacy,
            compression, trainer).
        adapter: the run's adapter (``model.pt`` merges it; peft's files beside it).
    """

    def __init__(
        self,
        run_dir: Path,
        settings: CheckpointSettings,
        layout: StateLayout,
        folded_keys: Collection[str],
        components: Mapping[str, Stateful],
        adapter: Any,
    ) -> None:
        self.run_dir, self.settings, self.components = Path(run_dir), settings, components
        self.folded_keys, self.adapter = set(folded_keys), adapter
        self.saved_keys = {k for k, rule in layout.rules.items() if rule != "keep"}
        self.saved_keys |= self.folded_keys

    def due(self, round_idx: int, rounds: int) -> bool:
        """Whether round ``round_idx`` of ``rounds`` ends with a checkpoint."""
        every = self.settings.every
        return bool(every) and (round_idx % every == 0 or round_idx == rounds)

    def save(
        self,
        progress: Progress,
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        local_state: Any,
        history: list[dict[str, Any]],
    ) -> Path:
        """Write the checkpoint of round ``progress.round``; returns its path."""
        return save(
            self.run_dir,
            self.settings,
            progress,
            global_state,
            global_vector,
            self.saved_keys,
            self.components,
            local_state,
            history,
        )

    def resume(self, global_state: MutableMapping[str, torch.Tensor]) -> tuple[Progress, dict]:
        """Restore the newest usable checkpoint (or the one named) into ``global_state``
        and the components; returns the progress and the payload (global vector, local
        keys and metric rows for the caller)."""
        payload = load(self.run_dir, self.settings)
        return restore(payload, global_state, self.components), payload

    def newest(self) -> Path | None:
        """The newest checkpoint on disk, if any."""
        found = checkpoint.list_checkpoints(self.run_dir)
        return found[0] if found else None

    def save_model(self, model: nn.Module, global_state: Mapping[str, torch.Tensor]) -> None:
        """``model.pt`` (and the adapter's files) of the final global state."""
        checkpoint.save_model(self.run_dir, model, global_state, self.adapter, self.folded_keys)


def save(
    run_dir: Path,
    settings: CheckpointSettings,
    progress: Progress,
    global_state: Mapping[str, torch.Tensor],
    global_vector: torch.Tensor,
    saved_keys: Collection[str],
    components: Mapping[str, Stateful],
    local_state: Any,
    history: list[dict[str, Any]],
) -> Path:
    """Write the checkpoint of round ``progress.round``; ``saved_keys`` are the weights
    that cannot be rebuilt. Returns its path."""
    payload = {
        "format": checkpoint.FORMAT,
        "round": progress.round,
        "config": settings.config,
        "global_state": {k: v.detach().cpu() for k, v in global_state.items() if k in saved_keys},
        "global_vector": global_vector.detach().cpu(),
        **{name: part.state_dict() for name, part in components.items()},
        "local_state": local_state,
        "rng": {"torch": torch.get_rng_state()},
        "progress": asdict(progress),
        "history": history,
    }
    return checkpoint.save_checkpoint(run_dir, progress.round, payload, settings.keep)


def load(run_dir: Path, settings: CheckpointSettings) -> dict[str, Any]:
    """The newest readable checkpoint of ``run_dir`` (or the one ``settings`` names),
    written with the same config unless ``settings.force``.

    Raises:
        ConfigError: no checkpoint, or one written with a different config.
        DataError: no checkpoint is readable (or the one named is not).
    """
    folder = Path(run_dir) / checkpoint.CHECKPOINT_DIR
    named = settings.resume_from
    candidates = [named] if named else checkpoint.list_checkpoints(run_dir)
    if not candidates:
        raise ConfigError(
            "resume",
            f"no checkpoint in {folder}; pass resume=RUN_FOLDER of a run that wrote "
            "checkpoints (checkpoint.every > 0)",
        )
    payload, path = None, None
    for path in candidates:
        try:
            payload = checkpoint.load_checkpoint(path)
            break
        except ValueError as exc:
            if named:
                raise DataError(f"{path}: unusable checkpoint: {exc}") from exc
            log.warning("%s: unusable checkpoint (%s); trying the previous one", path, exc)
    if payload is None:
        raise DataError(f"no usable checkpoint in {folder}")
    differences = checkpoint.config_differences(payload["config"], settings.config)
    if differences and not settings.force:
        shown = ", ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
        raise ConfigError(
            "resume",
            f"{path} was written with a different config: {shown}; "
            "set resume_force=true to resume anyway",
        )
    log.info("resuming after round %d from %s", payload["round"], path)
    return payload


def restore(
    payload: Mapping[str, Any],
    global_state: MutableMapping[str, torch.Tensor],
    components: Mapping[str, Stateful],
) -> Progress:
    """Copy a checkpoint's saved weights into ``global_state``, load each component's
    state and the torch RNG; returns the loop's progress. The global vector, local keys
    and metric rows are the caller's to take from ``payload``."""
    for key, value in payload["global_state"].items():
        global_state[key].copy_(value)
    for name, part in components.items():
        part.load_state_dict(payload.get(name, {}))
    torch.set_rng_state(payload["rng"]["torch"])
    return Progress(**payload["progress"])
