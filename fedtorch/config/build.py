"""Assemble a run from its config. Every ``hydra.utils.instantiate`` call is in this module.

:func:`build` runs ordered ``_setup_*`` steps: validate the config, pick the device, load the
data, partition it, build the model and check it against the data, then the client
trainer, engine, strategy and logger. Every user error surfaces here, before training.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedtorch import seeding
from fedtorch.config.validate import (
    check_components,
    check_engine_and_attack,
    check_eval_local,
    check_lr_schedule,
    resolve_device,
    validate_config,
)
from fedtorch.data import partition as partition_lib
from fedtorch.data.datasets import DataBundle, materialize, stream
from fedtorch.data.silos import Silos, load_silos, served_silos, silo_specs
from fedtorch.data.text_files import per_client_statistics
from fedtorch.errors import ConfigError, DataError, FedtorchError
from fedtorch.logging.files import RunLock, write_json
from fedtorch.models.memory_format import set_memory_format
from fedtorch.models.weights import load_initial_weights
from fedtorch.server import checkpoint
from fedtorch.server.checkpoint import CheckpointSettings
from fedtorch.server.evaluation import Evaluator
from fedtorch.server.orchestrator import Orchestrator
from fedtorch.server.progress import RunSettings
from fedtorch.server.resume import RunCheckpoints
from fedtorch.server.round_pipeline import RoundPipelines
from fedtorch.server.sampling import cohort_size
from fedtorch.server.traffic import Traffic
from fedtorch.state.layout import StateLayout, expand_key_rules
from fedtorch.strategies.base import RunContext
from fedtorch.strategies.lora_exact import check_exact_strategy, lora_pairs

log = logging.getLogger("fedtorch")


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` that turns import and argument errors into one-line ConfigErrors.

    Keys of ``node`` that the target does not accept are dropped with a warning: they are
    left over from the group's default option after ``KEY._target_=pkg.Thing`` swapped the
    target (Hydra's struct mode already rejects misspelled keys at compose time).
    """
    node = _drop_unaccepted(node, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        root: BaseException = exc
        while root.__cause__ is not None and not isinstance(root, FedtorchError):
            root = root.__cause__
        if isinstance(root, FedtorchError):
            raise root from exc
        if root is exc:  # Hydra's own message, e.g. the target does not import
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = lines[0] if lines else type(exc).__name__
        else:
            detail = f"{type(root).__name__}: {root}"
        raise ConfigError(
            f"{key}._target_", f"could not build {node.get('_target_')!r}: {detail}"
        ) from exc


def import_target(path: str, key: str) -> Any:
    """The object named by a dotted ``_target_`` path, or a one-line ConfigError."""
    parts = str(path).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and not module_name.startswith(exc.name):
                raise ConfigError(f"{key}._target_", f"importing {path!r} failed: {exc}") from exc
            continue
        except Exception as exc:
            raise ConfigError(
                f"{key}._target_", f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(
                f"{key}._target_", f"module {module_name!r} has no {'.'.join(parts[cut:])!r}"
            ) from None
        return obj
    raise ConfigError(
        f"{key}._target_",
        f"cannot import {path!r}: no module {parts[0]!r} (is it installed or on PYTHONPATH?)",
    )


def _drop_unaccepted(node: DictConfig, key: str) -> DictConfig:
    names = tuple(k for k in node if not str(k).startswith("_"))
    accepted = _accepted(node._target_, names, key)
    dropped = [k for k in names if k not in accepted]
    if not dropped:
        return node
    log.warning(
        "%s: ignoring %s: %s takes no such argument",
        key,
        ", ".join(f"{key}.{k}" for k in dropped),
        node._target_,
    )
    kept = OmegaConf.to_container(node, resolve=True)
    for k in dropped:
        kept.pop(k)
    return OmegaConf.create(kept)


def _accepted(target: str, names: tuple[str, ...], key: str = "model") -> set[str]:
    """Which of ``names`` the callable ``target`` accepts as keyword arguments."""
    fn = import_target(target, key)
    try:
        params = inspect.signature(fn).parameters
    except (ValueError, TypeError):  # builtins without a signature: pass everything
        return set(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


# Keys of `data` that say how the data is read, taken by the builder, not the loader.
_READING_KEYS = {"in_memory": True, "num_workers": 0, "pin_memory": False}


def _setup_data(cfg: DictConfig, device: torch.device) -> DataBundle:
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    spec.pop("silos", None)
    return _load_data(spec).to(device)


def _load_data(spec: dict[str, Any]) -> DataBundle:
    """Load the data ``spec`` (the resolved ``data`` keys) describes, on the CPU."""
    spec = dict(spec)
    reading = {k: spec.pop(k, default) for k, default in _READING_KEYS.items()}
    in_memory = reading["in_memory"]
    if not isinstance(in_memory, bool):
        raise ConfigError("data.in_memory", f"must be true or false, got {in_memory!r}")
    kwargs = {}
    if "in_memory" in _accepted(spec["_target_"], ("in_memory",), "data"):
        kwargs["in_memory"] = in_memory
    loaded = _instantiate(OmegaConf.create(spec), "data", **kwargs)
    if isinstance(loaded, tuple) and len(loaded) == 2:
        loaded = materialize(*loaded) if in_memory else stream(*loaded)
    if not isinstance(loaded, DataBundle):
        raise ConfigError(
            "data._target_",
            "must return a DataBundle or a (train, test) pair of datasets, "
            f"got {type(loaded).__name__}",
        )
    if len(loaded.train_y) == 0 or len(loaded.test_y) == 0:
        raise DataError(f"{loaded.name}: the training or test set is empty")
    loaded.configure_reading(**reading)
    return loaded


# Partitioners that do not read the rows' classes (a language model's rows have none).
_CLASS_FREE = {"fedtorch.data.partition.iid", "fedtorch.data.partition.quantity"}


def _setup_partition(cfg: DictConfig, data: DataBundle) -> list[torch.Tensor]:
    shards = _split_clients(cfg, data, cfg.num_clients, cfg.seed, "num_clients")
    return [s.to(data.train_y.device) for s in shards]


def _split_clients(
    cfg: DictConfig, data: DataBundle, num_clients: int | None, seed: int, key: str
) -> list[torch.Tensor]:
    """Cut ``data``'s training rows into ``num_clients`` clients with ``cfg.partition``
    (``key`` names the setting in errors)."""
    split = _instantiate(cfg.partition, "partition")
    extra = {}
    if "clients" in _accepted(cfg.partition._target_, ("clients", "dataset"), "partition"):
        extra = {"clients": data.client_indices, "dataset": data.name}
    elif num_clients is None:
        raise ConfigError(key, "null is only allowed with partition=natural; give a number >= 1")
    labels = data.labels_for_partition.cpu()
    if not data.has_row_classes and not extra and cfg.partition._target_ not in _CLASS_FREE:
        kind = str(cfg.partition._target_).rsplit(".", 1)[-1]
        raise ConfigError(
            "partition",
            f"{kind} splits rows by class, but the rows of {data.name} (a language model) have "
            "none; set data.category_column (dataset=text) or use partition=iid or quantity",
        )
    shards = split(labels, num_clients=num_clients, seed=seed, **extra)
    expected = num_clients if num_clients is not None else len(shards)
    if len(shards) != expected:
        raise ConfigError(
            "partition._target_", f"returned {len(shards)} shards for {key}={expected}"
        )
    empty = [i for i, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise ConfigError(
            key,
            f"{len(empty)} client(s) got no data (first: {empty[0]}); "
            "use fewer clients or another split",
        )
    return shards


def _check_natural_clients(cfg: DictConfig, data: DataBundle, num_clients: int) -> None:
    """A client column that gives fewer clients than ``clients_per_round`` asks for."""
    column = (data.stats or {}).get("client_column") if data.client_indices else None
    wanted = cfg.clients_per_round
    if column is None or not isinstance(wanted, int) or wanted <= num_clients:
        return
    raise ConfigError(
        "clients_per_round",
        f"{wanted}, but data.client_column={column!r} gives {num_clients} client(s); lower "
        "clients_per_round or use another partition (num_clients=N partition=iid)",
    )


def _setup_silos(
    cfg: DictConfig, device: torch.device
) -> tuple[DataBundle, list[torch.Tensor], Silos, dict]:
    """``data.silos``: this process's silos' data, every client's shard (placeholders for
    clients held elsewhere), the silo map and the partition statistics."""
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    natural = "clients" in _accepted(cfg.partition._target_, ("clients",), "partition")
    specs = silo_specs(spec, spec.pop("silos"), natural)
    # Under torchrun only engine=distributed gets this far (train._check_distributed).
    local, rank_of_silo = served_silos(
        len(specs), cfg.distributed.get("silo"), dist.is_initialized()
    )
    if cfg.eval_local or (cfg.eval_clients and rank_of_silo is not None):
        key = "eval_local" if cfg.eval_local else "eval_clients"
        raise ConfigError(key, "is not available with data.silos (data stays in its silo)")
    data, shards, silos, histograms = load_silos(
        specs,
        local,
        rank_of_silo,
        cfg.seed,
        _load_data,
        lambda d, n, seed, key: _split_clients(cfg, d, n, seed, f"{key}.num_clients"),
    )
    if cfg.num_clients is not None and cfg.num_clients != len(shards):
        raise ConfigError(
            "num_clients",
            f"must be null (the silos' clients) or their total {len(shards)} with data.silos, "
            f"got {cfg.num_clients}",
        )
    stats = partition_lib.statistics_of_histograms(histograms, len(data.train_y))
    if rank_of_silo is not None:
        stats["summary"]["unassigned_samples"] = None  # other silos' rows are not known here
    return data.to(device), [s.to(device) for s in shards], silos, stats


def _setup_model(
    cfg: DictConfig, data: DataBundle, device: torch.device, adapter: Any
) -> nn.Module:
    provided = {
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "vocab_size": data.vocab_size or data.num_classes,
        "pad_token_id": data.pad_id,
    }
    kwargs = {
        k: provided[k] for k in _accepted(cfg.model._target_, tuple(provided)) if k not in cfg.model
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.derive_seed(cfg.seed, seeding.MODEL_INIT))
        model = _instantiate(cfg.model, "model", **kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "model._target_", f"must build an nn.Module, got {type(model).__name__}"
            )
        _check_positions(model, data)
        if cfg.get("init_from"):
            load_initial_weights(model, Path(str(cfg.init_from)).expanduser())
        model = adapter.apply(model)  # LoRA's A is initialised from the same seeded stream
    model = model.to(device)
    with torch.no_grad():
        model.eval()
        try:
            out = model(data.train_x[:2])
        except Exception as exc:
            raise ConfigError(
                "model", f"forward pass on inputs of shape {list(data.input_shape)} failed: {exc}"
            ) from exc
    task = data.task
    if not isinstance(out, torch.Tensor) or out.shape != task.output_shape(
        data.train_x[:2], data.num_classes
    ):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            "model",
            f"outputs shape {shape} but the dataset {data.name} ({task.name.replace('_', ' ')}) "
            f"needs {task.describe_output(data.num_classes)}",
        )
    return model


def _check_positions(model: nn.Module, data: DataBundle) -> None:
    """Rows of token ids no longer than the positions the model has (``max_positions``,
    which ``model=hf`` reads from its config): a longer row fails deep in the forward."""
    limit = getattr(model, "max_positions", None)
    x = data.train_x
    if limit is None or not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] <= limit:
        return
    raise ConfigError(
        "data.sequence_length",
        f"rows of {x.shape[1]} tokens are longer than the model's {limit} positions; set "
        f"data.sequence_length={limit} or less (dataset=text cuts longer rows with "
        "data.truncation=true)",
    )


def _setup_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """The metrics logger; its trackers (``logger.trackers.*``) check their options and
    import their packages here, before training. A logger that takes ``config`` gets the
    resolved config (for the trackers' params and hparams), passed by a plain call: Hydra
    would instantiate every ``_target_`` in it."""
    make = _instantiate(cfg.logger, "logger", _partial_=True)
    extra = {}
    if "config" in _accepted(cfg.logger._target_, ("config",), "logger"):
        extra["config"] = OmegaConf.to_container(cfg, resolve=True)
    return make(run_dir=run_dir, rounds=cfg.rounds, **extra)


def resume_target(cfg: DictConfig) -> tuple[Path | None, Path | None]:
    """``(run folder, checkpoint file)`` named by ``resume=PATH``; ``(None, None)`` for
    ``resume=false``, ``true`` or ``auto`` (the current run folder)."""
    value = cfg.get("resume")
    if isinstance(value, bool) or value is None or value == "auto":
        return None, None
    path = Path(str(value)).expanduser()
    if path.is_file():
        name = re.fullmatch(r"round_\d+\.pt", path.name)
        if not name or path.parent.name != checkpoint.CHECKPOINT_DIR:
            raise ConfigError(
                "resume",
                f"{path} is not a checkpoint of a run: give RUN/{checkpoint.CHECKPOINT_DIR}/"
                "round_NNNNNN.pt or the run folder RUN",
            )
        return path.parent.parent, path
    if path.is_dir():
        return path, None
    raise ConfigError("resume", f"{path} is neither a run folder nor a checkpoint file")


def _checkpointing(cfg: DictConfig, run_dir: Path) -> CheckpointSettings:
    _, checkpoint_file = resume_target(cfg)
    resume = cfg.resume not in (False, None)
    if cfg.resume == "auto":  # a requeued job: continue if this run folder has a checkpoint
        resume = bool(checkpoint.list_checkpoints(run_dir))
    elif resume and checkpoint_file is None and not checkpoint.list_checkpoints(run_dir):
        raise ConfigError(
            "resume",
            f"no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}; pass resume=RUN_FOLDER "
            "of a run that wrote checkpoints (checkpoint.every > 0)",
        )
    elif not resume and checkpoint.list_checkpoints(run_dir):
        raise ConfigError(
            "resume",
            f"false, but {run_dir} holds checkpoints of a run; continue it with resume=true "
            "(or auto), or give this run another folder",
        )
    return CheckpointSettings(
        every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        config=checkpoint.flatten_config(OmegaConf.to_container(cfg, resolve=True)),
        resume=resume,
        resume_from=checkpoint_file,
        force=cfg.resume_force,
    )


def build(cfg: DictConfig, run_dir: Path) -> Orchestrator:
    """Validate ``cfg`` and assemble every component of the run writing to ``run_dir``.

    Raises:
        ConfigError / DataError: any user error, before training starts.
    """
    validate_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            "hydra.run.dir", f"output folder {run_dir} is not writable ({exc.strerror})"
        ) from exc
    run_lock = RunLock(run_dir)  # one writer per run folder, released when the run ends

    checkpointing = _checkpointing(cfg, run_dir)
    silos = None
    if cfg.data.get("silos") is not None:
        data, shards, silos, stats = _setup_silos(cfg, device)
    else:
        data = _setup_data(cfg, device)
        shards = _setup_partition(cfg, data)
        if data.stats is not None:
            if data.row_tokens is not None:
                data.stats["split"] = per_client_statistics(data, shards)
            write_json(run_dir / "dataset.json", data.stats)
        classes = data.num_classes if data.partition_labels is None else None
        stats = partition_lib.statistics(shards, data.labels_for_partition, classes)
    num_clients = len(shards)
    _check_natural_clients(cfg, data, num_clients)
    clients_per_round = cohort_size(num_clients, cfg.clients_per_round, cfg.fraction)
    write_json(run_dir / "partition.json", stats)

    adapter = _instantiate(cfg.adapter, "adapter")
    model = _setup_model(cfg, data, device, adapter)
    key_rules = expand_key_rules(model, OmegaConf.to_container(cfg.key_rules))
    # keep_vars: tied aliases (a Hugging Face lm_head sharing the embedding) count too.
    frozen = {
        k
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and not v.requires_grad
    }
    layout = StateLayout(model.state_dict(), key_rules, frozen)
    trainer = _instantiate(
        cfg.client,
        "client",
        model=model,
        layout=layout,
        train_x=data.train_x,
        train_y=data.train_y,
        seed=cfg.seed,
        task=data.task,
        precision=cfg.precision,
        **(
            {"rounds": cfg.rounds}
            if "rounds" in _accepted(cfg.client._target_, ("rounds",))
            else {}
        ),
    )
    set_memory_format(cfg.memory_format, model, trainer, data.train_x[:2], device)
    if cfg.eval_local:
        natural = "clients" in _accepted(cfg.partition._target_, ("clients",), "partition")
        check_eval_local(natural, data, trainer)
    engine = _instantiate(cfg.engine, "engine")
    if hasattr(engine, "check"):
        engine.check(trainer)
    check_lr_schedule(engine, trainer)
    if silos is not None and silos.rank_of_silo is not None:
        engine.place_clients(silos.rank_of_client)
    strategy = _instantiate(cfg.strategy, "strategy")
    strategy.bind(RunContext.of(trainer, layout, num_clients, clients_per_round, run_dir))
    privacy = _instantiate(cfg.privacy, "privacy", seed=cfg.seed)
    secure = privacy.secure_mode
    if secure is None:  # on where parties differ: silos hold other organisations' data
        secure = cfg.data.get("silos") is not None
    privacy.bind(num_clients, clients_per_round, cfg.rounds, bool(secure))
    if hasattr(trainer, "secure"):  # client=dpsgd draws its noise and batches the same way
        trainer.secure = bool(secure)
    secure_agg = _instantiate(cfg.secure_aggregation, "secure_aggregation", seed=cfg.seed)
    secure_agg.bind(
        privacy.clip_norm if privacy.enabled else None,
        privacy.enabled and privacy.mode == "local",
    )
    compression = _instantiate(cfg.compression, "compression", seed=cfg.seed)
    check_components(strategy, privacy, secure_agg, compression, adapter)
    compression.bind(layout, num_clients, run_dir)
    exact_lora = None
    if adapter.aggregation == "exact":
        check_exact_strategy(strategy, privacy.enabled, secure_agg.enabled)
        exact_lora = lora_pairs(model, layout)
    system = _instantiate(cfg.system, "system", seed=cfg.seed)
    attack = _instantiate(cfg.attack, "attack", num_clients=num_clients, seed=cfg.seed)
    check_engine_and_attack(
        engine, strategy, privacy, secure_agg, compression, adapter, attack, data
    )
    if hasattr(engine, "check_client_side"):  # client-side steps run where clients train
        engine.check_client_side(compression=compression, privacy=privacy, secure_agg=secure_agg)
    logger = _setup_logger(cfg, run_dir)

    settings = RunSettings(
        rounds=cfg.rounds,
        clients_per_round=clients_per_round,
        seed=cfg.seed,
        eval_every=cfg.eval_every,
        eval_clients=cfg.eval_clients,
        eval_local=cfg.eval_local,
        eval_batch_size=cfg.eval_batch_size,
        target_accuracy=cfg.target_accuracy,
        on_client_failure=cfg.on_client_failure,
        min_clients=cfg.min_clients,
        aggregation_memory_budget_mb=cfg.aggregation.memory_budget_mb,
    )
    folded_keys = {p.base for p in exact_lora or []}
    pipelines = RoundPipelines(
        strategy=strategy,
        layout=layout,
        attack=attack,
        compression=compression,
        privacy=privacy,
        secure_agg=secure_agg,
        exact_lora=exact_lora or [],
        shard_sizes=[len(s) for s in shards],
        summed=getattr(engine, "collective", "gather") == "allreduce",
        memory_budget_mb=settings.aggregation_memory_budget_mb,
        run_dir=run_dir,
    )
    traffic = Traffic(
        layout,
        model.state_dict(),
        strategy.extra_vectors,
        folded_keys,
        compression,
        secure_agg.bits if secure_agg.enabled else None,
        cfg.communication_budget_mb,
    )
    evaluator = Evaluator(
        model,
        data,
        shards,
        settings.eval_batch_size,
        local=settings.eval_local,
        per_client=settings.eval_clients,
        silos=silos,
        engine=engine,
        local_state=lambda: trainer.local_state,
        max_batches=cfg.eval_max_batches,
        memory_mb=cfg.eval_memory_mb,
    )
    return Orchestrator(
        model=model,
        layout=layout,
        trainer=trainer,
        engine=engine,
        strategy=strategy,
        data=data,
        shards=shards,
        settings=settings,
        logger=logger,
        run_dir=run_dir,
        pipelines=pipelines,
        traffic=traffic,
        evaluator=evaluator,
        system=system,
        checkpoints=RunCheckpoints(
            run_dir,
            checkpointing,
            layout,
            folded_keys,
            {
                "strategy": strategy,
                "privacy": privacy,
                "compression": compression,
                "trainer": trainer,
            },
            adapter,
        ),
        run_lock=run_lock,
        extra_summary={"dataset": data.name, "device": str(device), "partition": stats["summary"]},
    )
