"""Checkpoints and what exact resumption needs; model files.

A crash never leaves a half-written model, summary or checkpoint behind (files are written
with :func:`fedtorch.logging.files.atomic_write`); checkpoints load
with ``weights_only=True``; Ctrl-C is held back while the server state changes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtorch.logging.files import atomic_write, fsync_folder


def save_state(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save a ``state_dict`` (moved to CPU) atomically; load it with ``load_state``."""
    cpu_state = {k: v.detach().cpu() for k, v in state.items()}
    atomic_write(path, lambda fh: torch.save(cpu_state, fh))


def save_model(
    run_dir: Path,
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    adapter: Any,
    folded_keys: Collection[str],
) -> None:
    """``model.pt``: the final global ``state_dict`` (with an adapter, the base model with
    the adapter merged in), and the adapter in peft's format under ``adapter/`` (with
    ``aggregation=exact``, also the folded base it applies to, ``base_model.pt``)."""
    run_dir = Path(run_dir)
    if not adapter.enabled:
        save_state(global_state, run_dir / "model.pt")
        return
    model.load_state_dict(global_state)
    adapter.save(model, run_dir / "adapter")
    if folded_keys:  # the adapter applies to the folded base, not the initial one
        save_state(adapter.unloaded(model).state_dict(), run_dir / "adapter" / "base_model.pt")
    save_state(adapter.merged(model).state_dict(), run_dir / "model.pt")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a saved ``state_dict`` with ``weights_only=True`` (no code runs on load)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# Checkpoints: everything the next round depends on, one file per saved round.

CHECKPOINT_DIR = "checkpoints"
FORMAT = 1
# Config keys that may change between a run and its resumption: where files live, how
# much is logged and evaluated, how many rounds in total, how checkpoints are kept, and performance
# knobs (a different memory_format or aggregation budget changes results only by float
# rounding).
RESUME_IGNORED = (
    "resume",
    "data.num_workers",
    "data.pin_memory",
    "distributed",
    "resume_force",
    "checkpoint",
    "rounds",
    "logger",
    "paths",
    "verbose",
    "eval_every",
    "eval_batch_size",
    "eval_max_batches",
    "eval_memory_mb",
    "communication_budget_mb",
    "eval_clients",
    "eval_local",
    "torch_threads",
    "memory_format",
    "aggregation.memory_budget_mb",
    "data.root",
    "data.search_paths",
    "data.download",
)


def checkpoint_path(run_dir: Path, round_idx: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round_{round_idx:06d}.pt"


def save_checkpoint(run_dir: Path, round_idx: int, payload: dict, keep: int) -> Path:
    """Write ``payload`` atomically as round ``round_idx``'s checkpoint (owner-only: it holds
    per-client state); keep the last ``keep`` rounds up to this one. Checkpoints of later
    rounds belong to a run this one no longer continues (it resumed from an older one) and
    are removed, so pruning never deletes the newest round of this run."""
    path = checkpoint_path(run_dir, round_idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(payload, fh), private=True)
    found = list_checkpoints(run_dir)
    later = [p for p in found if checkpoint_round(p) > round_idx]
    upto = [p for p in found if checkpoint_round(p) <= round_idx]
    for old in later + upto[keep:]:
        old.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return path


def checkpoint_round(path: Path) -> int:
    """The round a checkpoint file (``round_NNNNNN.pt``) was written after."""
    return int(Path(path).stem.split("_", 1)[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, newest round first (temporary files ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return sorted(folder.glob("round_*.pt"), reverse=True) if folder.is_dir() else []


def load_checkpoint(path: Path) -> dict:
    """Load one checkpoint with ``weights_only=True``: tensors and plain data only, so a
    crafted file cannot run code. Raises ValueError with the reason if it is unusable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{type(exc).__name__}: {first[:200]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("not a fedtorch checkpoint (format field missing or unknown)")
    return payload


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested dict/list config, minus RESUME_IGNORED."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if any(name == p or name.startswith(p + ".") for p in RESUME_IGNORED):
            continue
        out.update(
            flatten_config(value, name) if isinstance(value, (Mapping, list)) else {name: value}
        )
    return out


# Keys added to the config after checkpoints were first written, with the value that
# behaves as the code did before them: a checkpoint without the key resumes when the key
# still has that value.
ADDED_KEYS: dict[str, Any] = {
    "adapter._target_": "fedtorch.models.adapters.NoAdapter",
    "init_from": None,
    "precision": 32,
    "client.grad_accum_steps": 1,
    "data.plays": None,
    "data.tokenizer": None,
    "adapter.aggregation": "separate",
    "compression._target_": "fedtorch.compression.Compression",
    "compression.kind": "none",
    "compression.error_feedback": False,
    "compression.downlink": "none",
    "aggregation.collective": "gather",
    "data.in_memory": True,
    "data.augment": False,
    "data.silos": None,
    "client.lr_schedule": "constant",
    "client.lr_min": 0.0,
    "privacy.secure_mode": None,
    "secure_aggregation.graph": "sparse",
    "secure_aggregation.dropout_rate": 0.1,
    "secure_aggregation.corruption_rate": 0.1,
    "secure_aggregation.dropout_stage": "input",
}


# Modules whose classes configs name in ``_target_`` and that moved when the package was
# regrouped by room: a checkpoint written before names the old path for the same class.
MOVED_MODULES = {
    "fedtorch.client.": "fedtorch.client.trainer.",
    "fedtorch.attacks.": "fedtorch.client.attacks.",
    "fedtorch.heterogeneity.": "fedtorch.client.heterogeneity.",
    "fedtorch.privacy.dpsgd.": "fedtorch.client.dpsgd.",
    "fedtorch.metrics.": "fedtorch.logging.metrics.",
    "fedtorch.trackers.": "fedtorch.logging.trackers.",
    "fedtorch.adapters.": "fedtorch.models.adapters.",
}


def _current_target(key: str, value: Any) -> Any:
    """A ``_target_`` written before a module moved, as it reads today."""
    if key.endswith("_target_") and isinstance(value, str):
        for before, after in MOVED_MODULES.items():
            rest = value[len(before) :]
            if value.startswith(before) and "." not in rest:
                return after + rest
    return value


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key (old -> new)`` for every key whose value differs or exists on one side only
    (a key of :data:`ADDED_KEYS` missing from ``old`` counts as its neutral value; a
    ``_target_`` in a module that moved, as :data:`MOVED_MODULES` says, as its new path)."""
    missing = object()
    old = {k: _current_target(k, v) for k, v in old.items()}
    old = {**{k: v for k, v in ADDED_KEYS.items() if k not in old and k in new}, **old}
    return [
        f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})"
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    ]


@dataclass
class CheckpointSettings:
    """When to checkpoint and whether to resume (``checkpoint.*``, ``resume*`` keys).

    Attributes:
        every: write a checkpoint every N rounds and at the last one (0: never).
        keep: how many recent checkpoints to keep.
        config: the flattened resolved config, compared on resume.
        resume: continue from the newest usable checkpoint in the run folder.
        resume_from: a specific checkpoint file to continue from.
        force: resume even if the config differs.
    """

    every: int = 0
    keep: int = 2
    config: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    resume_from: Path | None = None
    force: bool = False


class Interrupted(Exception):
    """Ctrl-C stopped the run; ``path`` is the checkpoint that resumes it (or None)."""

    def __init__(self, round_idx: int, path: Path | None) -> None:
        super().__init__(f"interrupted after round {round_idx}")
        self.round_idx, self.path = round_idx, path


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT inside the block and raise KeyboardInterrupt after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
