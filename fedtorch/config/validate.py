"""Checks of the config, run before anything is trained: the top-level keys before
anything is loaded, then the combinations of built components that cannot run together.

Each check raises :class:`~fedtorch.errors.ConfigError` with one line naming the key, the
value and what is allowed. Component-specific checks live with their component (the
partitioners check their own options, the client trainer its own).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from fedtorch.engines.distributed import COLLECTIVES
from fedtorch.errors import ConfigError
from fedtorch.strategies import averages_plainly

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
GROUPS = (
    "model",
    "adapter",
    "data",
    "partition",
    "strategy",
    "client",
    "engine",
    "logger",
    "system",
    "attack",
    "privacy",
    "secure_aggregation",
    "compression",
)


def _int(
    cfg: DictConfig, name: str, minimum: int, allow_none: bool = False, key: str | None = None
) -> None:
    value = cfg.get(name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key or name, f"must be an integer >= {minimum}, got {value!r}")


def _bool(cfg: DictConfig, key: str) -> None:
    if not isinstance(cfg.get(key), bool):
        raise ConfigError(key, f"must be true or false, got {cfg.get(key)!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; refuses CUDA on a machine without it.
    Under torchrun, ``cuda`` is the GPU of the process's ``LOCAL_RANK`` (ranks beyond the
    node's GPUs share them round-robin)."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ConfigError("device", f"must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per rank
        name = f"cuda:{int(os.environ['LOCAL_RANK']) % max(torch.cuda.device_count(), 1)}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "device", f"{name} requested but CUDA is not available; use device=cpu"
            )
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(
                "device", f"{name} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return torch.device(name)


def validate_config(cfg: DictConfig) -> None:
    """Validate the top-level keys and that every component group has a ``_target_``."""
    _int(cfg, "seed", 0)
    _int(cfg, "rounds", 1)
    _int(cfg, "num_clients", 1, allow_none=True)
    _int(cfg, "eval_every", 1)
    _int(cfg, "eval_batch_size", 1)
    _int(cfg, "eval_max_batches", 1, allow_none=True)
    memory = cfg.get("eval_memory_mb")
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory > 0:
        raise ConfigError("eval_memory_mb", f"must be a number > 0, got {memory!r}")
    _int(cfg, "torch_threads", 1, allow_none=True)
    if cfg.get("memory_format") not in MEMORY_FORMATS:
        raise ConfigError(
            "memory_format",
            f"must be {', '.join(MEMORY_FORMATS[:-1])} or {MEMORY_FORMATS[-1]}, "
            f"got {cfg.get('memory_format')!r}",
        )
    _bool(cfg, "eval_clients")
    _bool(cfg, "eval_local")
    _bool(cfg, "verbose")
    _int(cfg, "min_clients", 0)
    _int(cfg.checkpoint, "every", 0, key="checkpoint.every")
    _int(cfg.checkpoint, "keep", 1, key="checkpoint.keep")
    budget = cfg.aggregation.get("memory_budget_mb")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError("aggregation.memory_budget_mb", f"must be a number > 0, got {budget!r}")
    _check_distributed_keys(cfg)
    _bool(cfg, "resume_force")
    init_from = cfg.get("init_from")
    if init_from is not None and (not isinstance(init_from, str) or not init_from):
        raise ConfigError("init_from", f"must be null or a path, got {init_from!r}")
    resume = cfg.get("resume")
    if not isinstance(resume, (bool, str)) or resume == "":
        raise ConfigError("resume", f"must be false, true, auto or a run folder, got {resume!r}")
    if cfg.get("on_client_failure") not in ("drop", "raise"):
        raise ConfigError(
            "on_client_failure", f"must be drop or raise, got {cfg.get('on_client_failure')!r}"
        )
    budget_mb = cfg.get("communication_budget_mb")
    if budget_mb is not None and (
        isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or not budget_mb > 0
    ):
        raise ConfigError(
            "communication_budget_mb", f"must be null or a number > 0, got {budget_mb!r}"
        )
    target = cfg.get("target_accuracy")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1
    ):
        raise ConfigError("target_accuracy", f"must be null or in (0, 1], got {target!r}")
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(group, "missing or has no _target_; pick an option of its group")
    _check_finite(cfg)
    _check_optimizer(cfg.client.get("optimizer"))
    rules = cfg.get("key_rules")
    if not isinstance(rules, ListConfig) or not all(isinstance(r, DictConfig) for r in rules):
        raise ConfigError(
            "key_rules", f"must be a list of {{pattern: REGEX, rule: NAME}}, got {rules!r}"
        )


def _check_distributed_keys(cfg: DictConfig) -> None:
    """The distributed keys, checked in every run (not only under torchrun, where the
    engine and the start-up check them too), so a typo is not ignored in one process."""
    collective = cfg.aggregation.get("collective")
    if collective not in COLLECTIVES:
        raise ConfigError(
            "aggregation.collective", f"must be {' or '.join(COLLECTIVES)}, got {collective!r}"
        )
    distributed = cfg.get("distributed") or {}
    timeout = distributed.get("timeout_s")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError("distributed.timeout_s", f"must be a number > 0, got {timeout!r}")
    silo = distributed.get("silo")
    if silo is not None and cfg.data.get("silos") is None:
        raise ConfigError(
            "distributed.silo",
            f"is {silo!r}, but data.silos is not set: it names this process's silo of "
            "data.silos; leave it null",
        )


def _check_finite(node: Any, prefix: str = "") -> None:
    """No number in the config may be NaN or infinite: such a hyperparameter would train
    and fail rounds later (an lr of inf makes every client's update NaN), or pass checks
    such as ``lr > 0`` that it should not."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node)
    for key, value in items:
        if not prefix:
            name = str(key)
        else:
            name = f"{prefix}.{key}" if isinstance(key, str) else f"{prefix}[{key}]"
        if isinstance(value, (DictConfig, ListConfig)):
            _check_finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")


def _check_optimizer(opt: Any) -> None:
    if opt is None:
        raise ConfigError("client.optimizer", "missing; give a _target_ such as torch.optim.SGD")
    for key in ("lr", "momentum", "weight_decay"):
        value = opt.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"client.optimizer.{key}", f"must be a number, got {value!r}")
        if key == "lr" and not value > 0:
            raise ConfigError("client.optimizer.lr", f"must be > 0, got {value}")
        if value < 0:
            raise ConfigError(f"client.optimizer.{key}", f"must be >= 0, got {value}")


def check_eval_local(partition_target_accepts_clients: bool, data: Any, trainer: Any) -> None:
    """``eval_local`` needs each client's own test rows and keys that stay on the client."""
    if data.test_client_indices is None or not partition_target_accepts_clients:
        raise ConfigError(
            "eval_local",
            "needs each client's own test data: a dataset with natural clients "
            "(dataset=shakespeare, or dataset=text with data.client_column) and "
            "partition=natural",
        )
    if not trainer.local_keys:
        raise ConfigError(
            "eval_local",
            "evaluates each client's local keys, but no key is local; add key_rules with "
            "rule: local (e.g. [{pattern: '.*', rule: local}] for local-only training)",
        )


def check_lr_schedule(engine: Any, trainer: Any) -> None:
    """A round-wise learning rate needs an engine that trains through the client trainer
    (engine=vectorized builds its own optimizer for each cohort, at the configured lr)."""
    schedule = getattr(trainer, "lr_schedule", "constant")
    if schedule != "constant" and type(engine).__name__ == "VectorizedEngine":
        raise ConfigError(
            "client.lr_schedule",
            f"{schedule} sets each round's lr in the client trainer, which engine=vectorized "
            "does not use; use engine=sequential (or distributed)",
        )


def check_components(
    strategy: Any, privacy: Any, secure_agg: Any, compression: Any, adapter: Any
) -> None:
    """The combinations of strategy, privacy, secure aggregation, compression and adapter
    that cannot run together, each refused with one line."""
    if (privacy.enabled or secure_agg.enabled) and not averages_plainly(strategy):
        raise ConfigError(
            "strategy",
            f"{type(strategy).__name__} cannot run with privacy or secure aggregation, which "
            "release only the average update; use fedavg, fedprox, fedavgm, fedadagrad, "
            "fedadam or fedyogi",
        )
    if secure_agg.enabled and compression.enabled:
        raise ConfigError(
            "compression",
            f"compression={compression.kind} cannot run under secure aggregation: the masks "
            "make every coordinate of the sent vector non-zero and clients' scales differ, "
            "so nothing compressed survives the ring sum; use compression=none and fewer "
            "secure_aggregation.bits (bits/8 bytes a coordinate)",
        )
    if adapter.aggregation == "exact" and compression.downlink != "none":
        raise ConfigError(
            "compression.downlink",
            "adapter.aggregation=exact folds the clients' exact adapters into the base; "
            "a lossy broadcast would make them differ from the server's; use downlink=none",
        )


def check_engine_and_attack(
    engine: Any,
    strategy: Any,
    privacy: Any,
    secure_agg: Any,
    compression: Any,
    adapter: Any,
    attack: Any,
    data: Any,
) -> None:
    """An attack the data cannot have, and per-update server steps under an engine that
    sums updates on the ranks (``aggregation.collective=allreduce``)."""
    if attack.kind == "label_flip" and data.task.name != "classification":
        raise ConfigError(
            "attack", f"label_flip needs a classification dataset; {data.name} is not one"
        )
    if getattr(engine, "collective", "gather") == "allreduce":
        server_steps = privacy.enabled or secure_agg.enabled or compression.enabled
        server_steps = server_steps or attack.rewrites_updates
        if not averages_plainly(strategy) or server_steps or adapter.aggregation == "exact":
            raise ConfigError(
                "aggregation.collective",
                "allreduce sums updates on the ranks that trained them, so it needs a plain "
                "weighted mean (fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi) and no "
                "per-update step on the server (privacy, secure aggregation, compression, "
                "attacks, exact LoRA); use aggregation.collective=gather",
            )
