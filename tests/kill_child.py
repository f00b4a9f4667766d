"""Test helper: run training in this process and SIGKILL it at a chosen moment.

    python -m tests.kill_child RUN_DIR WHEN OVERRIDE...     (or run_and_kill from a test)

WHEN is one of
    after-checkpoint:R   right after round R's checkpoint is on disk (between rounds)
    mid-round:R          inside round R, after two clients have trained
    checkpoint-write:R   while round R's checkpoint is being written (a partial temp file)
The patches live here, in the test suite; fedtorch has no kill hooks.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

from fedtorch.client.trainer import ClientTrainer
from fedtorch.server import checkpoint
from fedtorch.train import train
from tests.conftest import REPO, compose_config


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(when: str) -> None:
    kind, round_text = when.split(":")
    target = int(round_text)
    if kind == "after-checkpoint":
        original = checkpoint.save_checkpoint

        def save_then_die(run_dir, round_idx, payload, keep):
            path = original(run_dir, round_idx, payload, keep)
            if round_idx == target:
                die()
            return path

        checkpoint.save_checkpoint = save_then_die
    elif kind == "mid-round":
        original_train = ClientTrainer.train
        calls = {"n": 0}

        def train_then_die(self, task, indices, state, vector, round_idx, out):
            if round_idx == target:
                calls["n"] += 1
                if calls["n"] == 3:
                    die()
            return original_train(self, task, indices, state, vector, round_idx, out)

        ClientTrainer.train = train_then_die
    elif kind == "checkpoint-write":
        original_write = checkpoint.atomic_write

        def write_half_then_die(path, write, **options):
            if Path(path).name == f"round_{target:06d}.pt":
                buffer = io.BytesIO()
                write(buffer)
                payload = buffer.getvalue()
                partial = Path(path).with_name(f".{Path(path).name}.partial.tmp")
                partial.write_bytes(payload[: len(payload) // 2])
                die()
            original_write(path, write, **options)

        checkpoint.atomic_write = write_half_then_die
    else:
        raise SystemExit(f"unknown WHEN {when!r}")


def run_and_kill(run_dir: Path, when: str, overrides: list[str]) -> None:
    """Run ``python -m tests.kill_child RUN_DIR WHEN OVERRIDES`` and check it was SIGKILLed."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kill_child", str(run_dir), when, *overrides],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


if __name__ == "__main__":
    run_dir, when, *overrides = sys.argv[1:]
    arm(when)
    train(compose_config(overrides), run_dir)
