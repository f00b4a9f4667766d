"""Shared fixtures: compose the real config tree and shrink it for fast tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from fedtorch.models.mlp import MLP

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Small, fast, still learnable: synthetic data, a few rounds. FAST adds a small MLP.
FAST_NO_MODEL = [
    "dataset=synthetic",
    "rounds=3",
    "num_clients=5",
    "client.optimizer.lr=0.1",
    "device=cpu",
    "logger=quiet",
]
FAST = [*FAST_NO_MODEL, "model=mlp", "model.hidden=[32]"]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The real config tree, composed with ``overrides`` (no Hydra run dir involved)."""
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_cli(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    """``python -m fedtorch.train ARGS`` in a subprocess; returns the CompletedProcess."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("FEDTORCH_FULL_ERROR", "HYDRA_FULL_ERROR")
    }
    full_env = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fedtorch.train", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def fast_overrides() -> list[str]:
    return list(FAST)


class SleepyRank1MLP(MLP):
    """The MLP, but rank 1 of a distributed run sleeps 60 s in its first training step
    (a hung rank, for the timeout test)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and os.environ.get("RANK") == "1" and not getattr(self, "slept", 0):
            self.slept = 1
            time.sleep(60)
        return super().forward(x)


class CrashOnceMLP(MLP):
    """The MLP, but rank 1 of a distributed run kills itself (SIGKILL) at its 40th training
    step of torchrun's first attempt; otherwise the plain MLP, bit for bit."""

    steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if self.training and os.environ.get("RANK") == "1" and first_attempt:
            CrashOnceMLP.steps += 1
            if CrashOnceMLP.steps == 40:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


class SlowEvalMLP(MLP):
    """The MLP, pausing 0.3 s per forward in eval mode (once per round's test evaluation).

    Gives a test that interrupts a CLI run part-way a wide, wall-clock window: every round
    takes at least 0.3 s however fast the CPU is. Training is untouched, so its results
    equal the plain MLP's bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            time.sleep(0.3)
        return super().forward(x)
