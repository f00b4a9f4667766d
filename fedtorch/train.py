"""Command-line entry point: ``python -m fedtorch.train [overrides]``.

Composes the Hydra config, writes the resolved ``config.yaml`` to the run folder, builds the
run and trains. User errors print one line (``error: KEY: ...``) and exit with status 2; set
``FEDTORCH_FULL_ERROR=1`` to get the traceback instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fedtorch.config.build import build, resume_target
from fedtorch.config.hydra_errors import precheck
from fedtorch.engines import process_group
from fedtorch.errors import ConfigError, DataError, FedtorchError
from fedtorch.logging.files import atomic_write_bytes
from fedtorch.server import checkpoint
from fedtorch.server.checkpoint import Interrupted
from fedtorch.server.evaluation import num_batches
from fedtorch.server.round_pipeline import RoundClientSide

log = logging.getLogger("fedtorch")


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one federated training job described by ``cfg``; return its summary.

    With ``resume=PATH`` the run continues in that folder instead of ``run_dir``.

    Raises:
        FedtorchError: a user error, before training starts.
        Interrupted: Ctrl-C; the checkpoint to resume from was saved.
    """
    resumed_dir, _ = resume_target(cfg)
    run_dir = resumed_dir or Path(run_dir)
    if process_group.launched():
        _check_distributed(cfg)
        if process_group.rank() != 0:
            _serve(cfg)
            return {}
        cfg = _resume_after_restart(cfg, run_dir)
    orchestrator = build(cfg, run_dir)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    part = orchestrator.extra_summary["partition"]
    log.info(
        "%s: %d clients (size min %d / median %.0f / max %d, %.2f classes each), %d per round, "
        "%d rounds on %s -> %s",
        orchestrator.data.name,
        part["num_clients"],
        part["min_size"],
        part["median_size"],
        part["max_size"],
        part["mean_classes_per_client"],
        orchestrator.settings.clients_per_round,
        cfg.rounds,
        orchestrator.extra_summary["device"],
        run_dir,
    )
    summary = orchestrator.run()
    # Only after a finished run: after an error or an interrupt the other ranks are ended
    # by torchrun (or by the same signal), and waiting for them would hide the message.
    if hasattr(orchestrator.engine, "close"):
        orchestrator.engine.close()
    log.info(
        "done: final accuracy %.4f, best %.4f (round %s), %.1fs",
        _or_nan(summary["final_accuracy"]),
        _or_nan(summary["best_accuracy"]),
        summary["best_round"],
        summary["wall_time_s"],
    )
    return summary


def _check_distributed(cfg: DictConfig) -> None:
    """Under torchrun: every rank composed the same config, and the engine is the
    distributed one (any other would train every client on every rank)."""
    process_group.check_config(cfg)
    target = cfg.engine.get("_target_", "")
    if not str(target).endswith("DistributedEngine"):
        raise ConfigError(
            "engine",
            f"launched as {process_group.world_size()} processes, but engine={target} would "
            "train every client on every rank; use engine=distributed",
        )


def _resume_after_restart(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """torchrun restarted the ranks after a crash (``--max_restarts``): continue from the
    newest checkpoint of the run folder, if there is one, losing at most the round that
    was in flight."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restarts or cfg.resume is not False or not checkpoint.list_checkpoints(run_dir):
        return cfg
    log.warning("restart %d: resuming from the newest checkpoint in %s", restarts, run_dir)
    cfg = cfg.copy()
    cfg.resume = True
    return cfg


def _serve(cfg: DictConfig) -> None:
    """A worker rank: build the same run in a scratch folder (nothing is written in the
    run folder) and train the clients rank 0 assigns until it says stop."""
    worker_cfg = cfg.copy()
    worker_cfg.resume = False  # rank 0 restores the run; workers get its weights
    with tempfile.TemporaryDirectory(prefix="fedtorch-rank") as scratch:
        orchestrator = build(worker_cfg, scratch)

        def evaluate_here() -> dict:
            orchestrator.model.load_state_dict(orchestrator.global_state)
            return orchestrator.evaluator.silo_totals_here()

        def evaluate_batches(batches: list[int]) -> torch.Tensor:
            orchestrator.model.load_state_dict(orchestrator.global_state)
            return orchestrator.evaluator.test_batch_totals(batches)

        def client_side(round_idx: int) -> RoundClientSide:
            # The client's steps of the round, run here on each update before it is sent.
            orchestrator.compression.start_round(round_idx)
            return orchestrator.pipelines.client_side(round_idx)

        evaluator = orchestrator.evaluator
        orchestrator.engine.serve(
            orchestrator.trainer,
            orchestrator.shards,
            orchestrator.global_state,
            orchestrator.global_vector,
            orchestrator.strategy,
            evaluate_here if orchestrator.silos is not None else None,
            evaluate_batches,
            test_batches=num_batches(len(evaluator.data.test_y), evaluator.batch_size),
            client_side=client_side,
        )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _log_to_files(line: str) -> None:
    """Append ``line`` to the run's log file (``train.log``) as an ERROR record, so the run
    folder says why the run stopped; the terminal gets the line once, from ``print``."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _full_errors() -> bool:
    return os.environ.get("FEDTORCH_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(version_base="1.3", config_path="pkg://fedtorch.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the best accuracy (useful to sweepers)."""
    hydra_cfg = HydraConfig.get()
    _handle_signals()
    try:
        summary = train(cfg, hydra_cfg.runtime.output_dir)
    except FedtorchError as exc:
        if _full_errors():
            raise
        _log_to_files(f"error: {exc}")
        if _trial_failure(exc, hydra_cfg):
            raise  # the sweeper prints it, records a failed trial and goes on
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        print(f"\ninterrupted after round {stop.round_idx}", file=sys.stderr)
        if stop.path is not None:
            run_dir = stop.path.parent.parent
            kept = [o for o in hydra_cfg.overrides.task if not o.startswith("resume")]
            launcher = "python -m fedtorch.train"
            if process_group.launched():
                launcher = f"fedtorch-run --nproc_per_node={process_group.world_size()} --"
            command = " ".join([launcher, *kept, f"resume={run_dir}"])
            print(f"checkpoint: {stop.path}\nresume with: {command}", file=sys.stderr)
        sys.exit(130)
    return summary.get("best_accuracy")  # None on worker ranks


def _trial_failure(exc: FedtorchError, hydra_cfg: Any) -> bool:
    """Whether ``exc`` ends only this trial of a search rather than the whole command.

    A sweeper that searches (Optuna, any but Hydra's basic one) records a job that raises
    as a failed trial and proposes the next (up to its ``max_failure_rate``): right for a
    run that failed while training, e.g. diverged with a learning rate it proposed. A
    config or data error would fail every trial alike, so it still stops the command, as
    it does in a single run or a grid sweep.
    """
    if isinstance(exc, ConfigError | DataError) or hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    return not str(hydra_cfg.sweeper.get("_target_", "")).endswith(".BasicSweeper")


def _ctrl_c(signum: int, frame: object) -> None:
    """Ctrl-C: note it (a peer rank that vanishes now was stopped too) and interrupt."""
    process_group.note_stop()
    raise KeyboardInterrupt


def _sigterm_as_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM (what schedulers and torchrun send before killing) acts like Ctrl-C: the
    SIGINT handler in force runs (deferred inside a round's critical section), or
    KeyboardInterrupt is raised."""
    process_group.note_stop()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _handle_signals() -> None:
    """Ctrl-C, and SIGTERM where nothing else handles it, stop a run as an interrupt.

    ``cli`` calls it before Hydra starts; :func:`main` calls it again for jobs that a
    launcher runs in processes of its own (joblib's workers), where the signals are still
    Python's defaults. A SIGTERM handler someone else installed (submitit's) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _ctrl_c)


def cli() -> None:
    """``python -m fedtorch.train``: Hydra's own config errors as one line, then run
    (under torchrun: join the process group and agree on one run folder first)."""
    try:
        precheck(sys.argv[1:])
    except FedtorchError as exc:
        if _full_errors():
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    _handle_signals()
    if process_group.launched():
        try:
            sys.argv = [sys.argv[0], *process_group.start(sys.argv[1:])]
        except FedtorchError as exc:
            if _full_errors():
                raise
            print(f"error: {exc}", file=sys.stderr)
            _leave(2)
    try:
        main()
    except KeyboardInterrupt:  # a worker rank stopped by Ctrl-C / SIGTERM
        _leave(130)
    except SystemExit as stop:
        if process_group.launched() and stop.code not in (0, None):
            _leave(stop.code if isinstance(stop.code, int) else 1)
        raise
    process_group.finish()


def _leave(code: int) -> None:
    """Exit now. Under torchrun, a rank that stops early must not wait for its peers: the
    process group's teardown would wait for messages in flight to peers that are stopping
    too. Exiting at once closes the connections, which is what the peers notice."""
    if not process_group.launched():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
