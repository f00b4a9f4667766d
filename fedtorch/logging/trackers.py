"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed by :class:`MetricsLogger`.

Each tracker is built by Hydra from ``logger.trackers.NAME`` (``logger=tensorboard``,
``logger=[tensorboard,mlflow]``) and has the same small interface, :class:`Tracker`:
``start`` when the first round starts (with the rows a resumed run restored), ``log`` once
per round (``step`` = the round), ``finish`` after ``summary.json`` and ``model.pt`` are
written (or after an error, without a summary).

Building a tracker only checks its options and imports its package, so a bad option or a
missing extra stops the run before training, and a process that builds the run but never
trains it (a worker rank of ``engine=distributed``) writes nothing.

Resume: the rows of the checkpoint are never sent twice. TensorBoard hides whatever earlier
sessions of the run folder wrote (``purge_step``) and writes the restored rows again.
MLflow and W&B continue the run whose id is kept in ``trackers.json`` in the run folder and
send only rounds past the last one they received; rounds sent after the checkpoint by the
interrupted session are kept as sent (neither offers deleting logged steps; an exact resume
recomputes the same values, timings aside).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from fedtorch.errors import ConfigError, require
from fedtorch.logging.files import write_json

STATE_FILE = "trackers.json"  # in the run folder: each tracker's run id and last round sent


class Tracker(Protocol):
    """What :class:`fedtorch.logging.metrics.MetricsLogger` calls on each of ``logger.trackers``."""

    def start(
        self, run_dir: Path, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
    ) -> None:
        """Open the tracker's run; ``history`` holds the rows restored on resume (or none)."""

    def log(self, row: Mapping[str, Any]) -> None:
        """Record one round's row (its numeric columns, step = ``row["round"]``)."""

    def finish(self, summary: Mapping[str, Any] | None, run_dir: Path, status: str) -> None:
        """Close the run: ``status`` is finished | failed | interrupted; ``summary`` is
        ``summary.json``'s content after a finished run, else None."""


class TensorBoardTracker:
    """Event files for TensorBoard (``torch.utils.tensorboard.SummaryWriter``).

    Every numeric column of a row is a scalar at step = round; after a finished run the
    flattened resolved config is written as hparams, with the summary's accuracy and loss
    as their metrics (``hparam/best_accuracy``, ...).

    Args:
        log_dir: folder of the event files, relative to the run folder (or absolute).
        flush_secs: write pending events to disk at least this often (seconds).
        hparams: write the config as hparams at the end.
    """

    key = "logger.trackers.tensorboard"

    def __init__(self, log_dir: str = "tensorboard", flush_secs: int = 30, hparams: bool = True):
        require("tensorboard", self.key, "TensorBoard logging", extra="tensorboard")
        if not isinstance(flush_secs, int) or flush_secs < 1:
            raise ConfigError(
                f"{self.key}.flush_secs", f"must be an integer >= 1, got {flush_secs!r}"
            )
        self.log_dir, self.flush_secs, self.hparams = str(log_dir), flush_secs, hparams
        self._writer: Any = None
        self._config: dict[str, Any] = {}
        self._step = 0

    def start(
        self, run_dir: Path, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=1: TensorBoard drops every event of step >= 1 written before this one,
        # i.e. all an earlier session of this run folder logged; the history is rewritten.
        self._writer = SummaryWriter(
            str(Path(run_dir) / self.log_dir), purge_step=1, flush_secs=self.flush_secs
        )
        self._config = flatten(config)
        for row in history:
            self.log(row)

    def log(self, row: Mapping[str, Any]) -> None:
        self._step = int(row["round"])
        for key, value in numeric(row).items():
            self._writer.add_scalar(key, value, global_step=self._step)

    def finish(self, summary: Mapping[str, Any] | None, run_dir: Path, status: str) -> None:
        if self._writer is None:
            return
        if summary is not None and self.hparams:
            from torch.utils.tensorboard.summary import hparams

            metrics = {
                f"hparam/{k}": summary[k]
                for k in ("best_accuracy", "final_accuracy", "final_loss")
                if _is_number(summary.get(k))
            }
            # In this run's own event file (add_hparams would open a sub-run), at the last
            # step, so a later resume's purge hides it like the scalars.
            writer = self._writer._get_file_writer()
            for part in hparams(self._config, metrics):
                writer.add_summary(part, self._step)
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, global_step=self._step)
        self._writer.close()
        self._writer = None


class _ContinuedRun:
    """A tracker that continues one run across the sessions of a run folder: rounds up to
    ``_sent`` reached it in an earlier session and are not sent again."""

    _sent: int

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        if step <= self._sent:
            return
        self._send(step, numeric(row))
        self._sent = step
        self._save()

    def _send(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def _save(self) -> None:
        raise NotImplementedError


class MLflowTracker(_ContinuedRun):
    """An MLflow run (``mlflow.MlflowClient``): params, metrics per round, summary, files.

    Params are the flattened resolved config; each round's numeric columns are metrics at
    step = round; after a finished run the summary's numbers are metrics ``summary/KEY``
    and the files in ``artifacts`` are uploaded. The run's status ends FINISHED, FAILED or
    KILLED (interrupted).

    Args:
        tracking_uri: the store or server (``sqlite:///PATH``, ``http://host:5000``, ...).
        experiment_name: the experiment the run goes to (created if missing).
        run_name: the run's name; None: the run folder's name.
        artifact_location: where a newly created experiment keeps its files; None: a
            ``mlartifacts`` folder next to a ``sqlite:///`` store, else the server's default.
        artifacts: files of the run folder uploaded at the end (missing ones skipped).
    """

    key = "logger.trackers.mlflow"

    def __init__(
        self,
        tracking_uri: str = "sqlite:///outputs/mlflow.db",
        experiment_name: str = "fedtorch",
        run_name: str | None = None,
        artifact_location: str | None = None,
        artifacts: Sequence[str] = ("metrics.png", "summary.json", "model.pt", "config.yaml"),
    ):
        require("mlflow", self.key, "MLflow logging", extra="mlflow")
        for name, value in (("tracking_uri", tracking_uri), ("experiment_name", experiment_name)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"{self.key}.{name}", f"must be a non-empty string, got {value!r}"
                )
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.run_name, self.artifact_location = run_name, artifact_location
        self.artifacts = [str(a) for a in artifacts]
        self._client: Any = None
        self._run_id = ""
        self._run_dir = Path()
        self._sent = 0  # last round the MLflow run received

    def start(
        self, run_dir: Path, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
    ) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._run_dir = Path(run_dir)
        location, db = self.artifact_location, None
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            location = location or (db.parent.resolve() / "mlartifacts").as_uri()
        # Opening a new SQLite store creates its tables: one process at a time (the
        # parallel runs of a sweep would otherwise race through the same migrations).
        with _file_lock(db):
            client = self._client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                experiment_id = client.create_experiment(self.experiment_name, location)
        earlier = _read_state(self._run_dir).get("mlflow") if history else None
        if earlier:
            try:
                client.update_run(earlier["run_id"], status="RUNNING")
                self._run_id, self._sent = earlier["run_id"], int(earlier["round"])
            except MlflowException:  # deleted, or another store: start a new run
                earlier = None
        if not earlier:
            run = client.create_run(
                experiment_id,
                run_name=self.run_name or default_run_name(self._run_dir),
                tags={"fedtorch.run_dir": str(self._run_dir.resolve())},
            )
            self._run_id, self._sent = run.info.run_id, 0
            # MLflow keeps at most 6000 characters of a value and 100 params a call.
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):
                client.log_batch(self._run_id, params=params[i : i + 100])
            self._save()
        for row in history:
            self.log(row)

    def _send(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def finish(self, summary: Mapping[str, Any] | None, run_dir: Path, status: str) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        if summary is not None:
            now = int(time.time() * 1000)
            values = numeric(flatten(summary))
            metrics = [Metric(f"summary/{k}", float(v), now, self._sent) for k, v in values.items()]
            self._client.log_batch(self._run_id, metrics=metrics)
            for name in self.artifacts:
                path = Path(run_dir) / name
                if path.is_file():
                    self._client.log_artifact(self._run_id, str(path))
        states = {"finished": "FINISHED", "interrupted": "KILLED"}
        self._client.set_terminated(self._run_id, states.get(status, "FAILED"))
        self._client = None

    def _save(self) -> None:
        _write_state(self._run_dir, "mlflow", {"run_id": self._run_id, "round": self._sent})


class WandbTracker(_ContinuedRun):
    """A Weights & Biases run (``wandb.init``): config, metrics per round, summary.

    Offline by default: the run is written under ``DIR/wandb/offline-run-*`` and uploaded
    later with ``wandb sync``. The run ends with exit code 0 (finished) or 1.

    Args:
        project: the W&B project.
        entity: the user or team; None: the default of the logged-in account.
        name: the run's display name; None: the run folder's name.
        group: groups runs in the UI (a sweep's runs, say); None: no group.
        mode: offline | online | disabled.
        dir: where ``wandb/`` is written; None: the run folder.
    """

    key = "logger.trackers.wandb"
    modes = ("offline", "online", "disabled")

    def __init__(
        self,
        project: str = "fedtorch",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        mode: str = "offline",
        dir: str | None = None,
    ):
        if mode not in self.modes:
            raise ConfigError(
                f"{self.key}.mode", f"must be one of {' | '.join(self.modes)}, got {mode!r}"
            )
        self._wandb = require("wandb", self.key, "Weights & Biases logging", extra="wandb")
        self.project, self.entity, self.name, self.group = project, entity, name, group
        self.mode, self.dir = mode, dir
        self._run: Any = None
        self._run_dir = Path()
        self._sent = 0  # last round the W&B run received

    def start(
        self, run_dir: Path, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
    ) -> None:
        self._run_dir = Path(run_dir)
        earlier = _read_state(self._run_dir).get("wandb") if history else None
        self._sent = int(earlier["round"]) if earlier else 0
        wandb_dir = Path(self.dir) if self.dir else self._run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._run = self._wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name or default_run_name(self._run_dir),
            group=self.group,
            id=earlier["id"] if earlier else None,
            resume="allow" if earlier else None,
            dir=str(wandb_dir),
            mode=self.mode,
            config=dict(config),
        )
        self._save()
        for row in history:
            self.log(row)

    def _send(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def finish(self, summary: Mapping[str, Any] | None, run_dir: Path, status: str) -> None:
        if self._run is None:
            return
        if summary is not None:
            self._run.summary.update(dict(summary))
        self._run.finish(exit_code=0 if status == "finished" else 1)
        self._run = None

    def _save(self) -> None:
        _write_state(self._run_dir, "wandb", {"id": self._run.id, "round": self._sent})


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of nested mappings; lists become JSON text and
    None ``"null"``, so every value is a number, bool or string (what hparams and params
    take)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def numeric(row: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric columns of ``row`` but ``round`` (the step): what goes to a tracker."""
    return {k: v for k, v in row.items() if k != "round" and _is_number(v)}


def default_run_name(run_dir: Path) -> str:
    """The run folder's name; for a sweep's numbered folder, ``SWEEP/N``."""
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.isdigit() else run_dir.name


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on ``PATH.lock`` (POSIX; elsewhere, and for None, no lock)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(run_dir: Path, name: str, entry: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / STATE_FILE, {**_read_state(run_dir), name: dict(entry)})
