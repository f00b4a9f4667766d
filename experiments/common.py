"""Helpers shared by the experiment scripts: run one fedtorch job into a folder, read its
results back, and replace a marked block of a README with a fresh table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def interruptible() -> None:
    """Let SIGINT reach the runs this script starts (``run_fedtorch``'s deadline sends it).

    A script started in the background (``nohup ... &`` from a non-interactive shell)
    inherits SIGINT ignored, and an ignored signal stays ignored across exec, so the runs
    would never see the interrupt and would train on past the deadline. A handled signal is
    reset to the default in a child, where Python turns it into KeyboardInterrupt. Call
    once from the main thread, before starting runs.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_fedtorch(
    overrides: list[str], out: Path, threads: int = 1, deadline: float | None = None
) -> bool:
    """``python -m fedtorch.train OVERRIDES`` writing into ``out`` (files only, no bar).

    With ``deadline`` (a ``time.time()`` value) a run still going then gets SIGINT, as from
    Ctrl-C: it checkpoints its last finished round and exits, to be resumed later. Returns
    True if the run finished, False if it was stopped at the deadline.
    """
    cmd = [
        sys.executable,
        "-m",
        "fedtorch.train",
        *overrides,
        "logger=quiet",
        f"torch_threads={threads}",
        f"hydra.run.dir={out}",
    ]
    if deadline is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        raise RuntimeError(
            "SIGINT is ignored in this process, so the run would not stop at the deadline: "
            "call interruptible() from the main thread before starting runs"
        )
    print(" ".join(cmd[2:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(cmd, cwd=REPO, env=env) as process:
        try:
            code = process.wait(None if deadline is None else max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            code = process.wait()
            if code == 130:
                return False
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return True


def load_run(folder: Path) -> tuple[dict, list[dict]] | None:
    """(summary, metric rows) of a finished run, or None if it has no summary yet."""
    if not (folder / "summary.json").exists():
        return None
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return json.loads((folder / "summary.json").read_text()), rows


def replace_block(readme: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``readme``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text() if readme.exists() else ""
    if start in content and end in content:
        before, rest = content.split(start, 1)
        readme.write_text(f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def stop_time(hh_mm: str) -> float:
    """The next time.time() at local HH:MM (today, or tomorrow if that has passed)."""
    try:
        hour, minute = (int(x) for x in hh_mm.split(":"))
        now = time.localtime()
        target = time.mktime((*now[:3], hour, minute, 0, 0, 0, -1))
    except (ValueError, OverflowError):
        raise SystemExit(f"error: --stop-at: {hh_mm!r} is not a time HH:MM") from None
    return target if target > time.time() else target + 86400
