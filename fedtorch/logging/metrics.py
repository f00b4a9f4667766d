"""Metric sinks: per-round rows to CSV and JSONL, the progress bar, the plot, and
experiment trackers (TensorBoard, MLflow, W&B: :mod:`fedtorch.logging.trackers`)."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedtorch.errors import ConfigError
from fedtorch.logging.trackers import Tracker

log = logging.getLogger("fedtorch")

# Columns of metrics.csv, in order; a row may leave some empty (no evaluation that round).
BASE_COLUMNS = (
    "round",
    "clients",
    "dropped",
    "failed",
    "malicious",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_perplexity",
    "local_test_loss",
    "local_test_accuracy",
    "client_accuracy_mean",
    "client_accuracy_worst10",
    "epsilon",
    "clip_norm",
    "client_epsilon_max",
    "bytes_up",
    "bytes_down",
    "compression_ratio",
    "compression_ratio_down",
    "round_time_s",
    "elapsed_s",
)


class MetricsLogger:
    """Writes one row per round to ``metrics.csv`` and ``metrics.jsonl`` in ``run_dir``,
    shows a tqdm bar over rounds, draws ``metrics.png`` at the end, and feeds the same rows
    to each experiment tracker of ``trackers``.

    Args:
        run_dir: the run's output folder.
        rounds: total rounds (length of the progress bar).
        csv: write ``metrics.csv``.
        jsonl: write ``metrics.jsonl``.
        plot: draw ``metrics.png`` (accuracy and loss by round) when closed.
        progress: show the progress bar.
        trackers: experiment trackers by name (``logger.trackers.NAME``, each built by
            Hydra from its ``_target_``); they open their runs when the first round starts.
        config: the resolved config, handed to the trackers (params, hparams).

    Raises:
        ConfigError: an entry of ``trackers`` is not a tracker (it has no ``_target_``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        rounds: int,
        csv: bool = True,
        jsonl: bool = True,
        plot: bool = True,
        progress: bool = True,
        trackers: Mapping[str, Tracker] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        for name, tracker in (trackers or {}).items():
            if not all(callable(getattr(tracker, m, None)) for m in ("start", "log", "finish")):
                raise ConfigError(
                    f"logger.trackers.{name}",
                    "needs a _target_ naming a tracker class (start, log, finish), such as "
                    "fedtorch.logging.trackers.TensorBoardTracker",
                )
        self.trackers = dict(trackers or {})
        self.config = dict(config or {})
        self._trackers_started = False
        self.run_dir = Path(run_dir)
        self.plot = plot
        self.history: list[dict[str, Any]] = []
        # Kept open for the whole run (one row per round), closed by close().
        self._csv_file = open(self.run_dir / "metrics.csv", "w", newline="") if csv else None  # noqa: SIM115
        self._csv = None
        if self._csv_file:
            self._csv = _csv_writer(self._csv_file)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "w") if jsonl else None  # noqa: SIM115
        self._bar_args = {"total": rounds, "disable": not progress}
        self._bar: tqdm | None = None

    def start(self) -> None:
        """Show the progress bar and open the trackers' runs (called when the first round
        starts, after :meth:`restore`)."""
        if not self._trackers_started:
            self._trackers_started = True
            for tracker in self.trackers.values():
                tracker.start(self.run_dir, self.config, self.history)
        if self._bar is None:  # after the trackers, whose start-up is not a round's time
            self._bar = tqdm(desc="rounds", unit="round", dynamic_ncols=True, **self._bar_args)

    def restore(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Start from the rows of an earlier session of this run (resume): the files are
        rewritten to hold exactly these rows, dropping any logged after the checkpoint."""
        for row in history:
            row = dict(row)
            self.history.append(row)
            if self._csv is not None:
                self._csv.writerow({k: _fmt(row.get(k)) for k in BASE_COLUMNS})
            if self._jsonl is not None:
                self._jsonl.write(json.dumps(row) + "\n")
        for fh in (self._csv_file, self._jsonl):
            if fh is not None:
                fh.flush()
        self._bar_args["initial"] = len(self.history)

    def log(self, row: Mapping[str, Any]) -> None:
        """Record one round's metrics and advance the progress bar."""
        row = dict(row)
        self.history.append(row)
        if self._csv is not None:
            self._csv.writerow({k: _fmt(row.get(k)) for k in BASE_COLUMNS})
            self._csv_file.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        self.start()
        for tracker in self.trackers.values():
            tracker.log(row)
        postfix = {}
        last_eval = next(
            (h for h in reversed(self.history) if h.get("test_accuracy") is not None), None
        )
        if last_eval:
            postfix["acc"] = f"{last_eval['test_accuracy']:.4f}"
            postfix["loss"] = f"{last_eval['test_loss']:.4f}"
        if row.get("train_loss") is not None:
            postfix["train_loss"] = f"{row['train_loss']:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self, summary: Mapping[str, Any] | None = None, status: str = "finished") -> None:
        """Close files and the bar, draw the plot if asked, then close the trackers' runs.

        Args:
            summary: the run's ``summary.json`` content, after a finished run (the
                trackers record it and upload the run's files); None otherwise.
            status: how the run ended: finished | failed | interrupted.
        """
        if self._bar is not None:
            self._bar.close()
        for fh in (self._csv_file, self._jsonl):
            if fh is not None:
                fh.close()
        if self.plot and self.history:
            plot_history(self.history, self.run_dir / "metrics.png")
        for name, tracker in self.trackers.items():
            # The run's results are on disk already: a tracker that fails to close (a
            # server gone away) is reported, and the others still close.
            try:
                tracker.finish(summary, self.run_dir, status)
            except Exception as exc:
                log.warning(
                    "logger.trackers.%s: closing failed: %s: %s", name, type(exc).__name__, exc
                )


def _csv_writer(fh) -> csv.DictWriter:
    writer = csv.DictWriter(fh, fieldnames=list(BASE_COLUMNS))
    writer.writeheader()
    return writer


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot_history(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Two panels: test/train accuracy and test/train loss against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (
        ("test_accuracy", ax_acc, "test"),
        ("train_accuracy", ax_acc, "train (local)"),
        ("test_loss", ax_loss, "test"),
        ("train_loss", ax_loss, "train (local)"),
    ):
        points = [(h["round"], h[key]) for h in history if _is_number(h.get(key))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy", title="accuracy")
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
