"""Checkpoints and exact resume: a run killed at any moment and resumed ends bit-identical
to an uninterrupted one; bad, foreign and malicious checkpoints are refused clearly."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedtorch.errors import ConfigError, DataError
from fedtorch.server import checkpoint
from fedtorch.train import train
from tests.conftest import FAST, REPO, compose_config, run_cli
from tests.kill_child import run_and_kill

# Stateful on both sides: server momentum-free SCAFFOLD keeps c and every c_i; client
# momentum; drop-outs and random local work exercise the seeded draws after a resume.
RUN = [
    *FAST,
    "rounds=5",
    "num_clients=6",
    "strategy=scaffold",
    "client.optimizer.momentum=0.5",
    "system.dropout=0.2",
    "system.work=uniform_steps",
    "system.low=2",
    "system.high=6",
    "min_clients=0",
    "checkpoint.every=1",
    "checkpoint.keep=3",
]
TIMING = ("round_time_s", "elapsed_s")
# For the CLI runs a test signals part-way: the rounds left outlast the signal's delivery.
SLOW = "model._target_=tests.conftest.SlowEvalMLP"


def outcome(run_dir: Path) -> tuple[dict, list[dict]]:
    model = checkpoint.load_state(run_dir / "model.pt")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return model, [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same(run_dir: Path, reference: Path) -> None:
    model, rows = outcome(run_dir)
    ref_model, ref_rows = outcome(reference)
    assert rows == ref_rows
    assert model.keys() == ref_model.keys()
    assert all(torch.equal(model[k], ref_model[k]) for k in model)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    train(compose_config(RUN), run_dir)
    return run_dir


def killed_run(run_dir: Path, when: str, extra=()) -> None:
    run_and_kill(run_dir, when, [*RUN, *extra])


@pytest.mark.parametrize(
    ("when", "resumes_after"),
    [("after-checkpoint:2", 2), ("mid-round:3", 2), ("checkpoint-write:4", 3)],
)
def test_killed_and_resumed_run_is_bit_identical(tmp_path, reference, when, resumes_after):
    killed_run(tmp_path, when)
    newest = checkpoint.list_checkpoints(tmp_path)[0]
    assert newest.name == f"round_{resumes_after:06d}.pt"
    train(compose_config([*RUN, "resume=true"]), tmp_path)
    assert_same(tmp_path, reference)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, caplog):
    killed_run(tmp_path, "after-checkpoint:3")
    newest = checkpoint.list_checkpoints(tmp_path)[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    train(compose_config([*RUN, f"resume={tmp_path}"]), tmp_path / "ignored")
    assert any("round_000003.pt: unusable checkpoint" in m for m in caplog.messages)
    assert_same(tmp_path, reference)
    broken = checkpoint.list_checkpoints(tmp_path)[-1]
    broken.write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"{broken.name}: unusable checkpoint"):
        train(compose_config([*RUN, f"resume={broken}"]), tmp_path)  # named: no fallback


def test_checkpoints_keep_the_newest(reference):
    names = [p.name for p in checkpoint.list_checkpoints(reference)]
    assert names == ["round_000005.pt", "round_000004.pt", "round_000003.pt"]
    assert not list((reference / "checkpoints").glob("*.tmp"))


def test_resume_refuses_another_config_unless_forced(tmp_path, reference):
    killed_run(tmp_path, "after-checkpoint:2")
    changed = [*RUN, "resume=true", "seed=1", "client.optimizer.lr=0.2"]
    with pytest.raises(ConfigError, match=r"^resume: .*client.optimizer.lr \(0.1 -> 0.2\), seed"):
        train(compose_config(changed), tmp_path)
    train(compose_config([*changed, "resume_force=true"]), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_completed"] == 5
    with pytest.raises(ConfigError, match="^resume: no checkpoint in"):
        train(compose_config([*RUN, "resume=true"]), tmp_path / "empty")


class Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_and_model_files_cannot_run_code(tmp_path, reference, caplog):
    killed_run(tmp_path, "after-checkpoint:2")
    marker = tmp_path / "pwned"
    evil = checkpoint.checkpoint_path(tmp_path, 4)
    evil.write_bytes(pickle.dumps({"format": 1, "x": Exploit(marker)}))
    torch.save({"weight": Exploit(marker)}, tmp_path / "evil_model.pt")
    train(compose_config([*RUN, "resume=true"]), tmp_path)  # skips the crafted file
    assert any("round_000004.pt: unusable checkpoint" in m for m in caplog.messages)
    assert not marker.exists()
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load_state(tmp_path / "evil_model.pt")
    assert not marker.exists()


def wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen, timeout=120) -> None:
    metrics = run_dir / "metrics.csv"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not get far enough")


def popen_cli(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "fedtorch.train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_at_a_terminal,
    )


def sigint_as_at_a_terminal() -> None:
    """In the child: SIGINT back to its default, so Python turns it into Ctrl-C (a suite
    started in the background by a non-interactive shell inherits SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
def test_cli_sigkill_then_resume(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = popen_cli([*RUN, SLOW, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for_rows(run_dir, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = run_cli([*RUN, SLOW, f"resume={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same(run_dir, reference)


@pytest.mark.parametrize(
    "signum",
    [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM],  # default-suite time
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, reference, signum):
    """Ctrl-C, and SIGTERM (what schedulers send before they kill a job), alike."""
    run_dir = tmp_path / "run"
    proc = popen_cli([*RUN, SLOW, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for_rows(run_dir, 1, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: "))
    args = command.removeprefix("resume with: python -m fedtorch.train ").split()
    assert args[-1] == f"resume={run_dir}"
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same(run_dir, reference)


def test_resume_auto_starts_fresh_then_continues(tmp_path, reference):
    run_dir = tmp_path / "run"
    train(compose_config([*RUN, "rounds=3", "resume=auto"]), run_dir)  # no checkpoint yet
    assert len(outcome(run_dir)[1]) == 3
    train(compose_config([*RUN, "resume=auto"]), run_dir)  # a requeued job: continues
    assert_same(run_dir, reference)


def test_checkpoints_from_before_added_keys_resume_while_the_keys_keep_neutral_values():
    from fedtorch.server.checkpoint import config_differences

    old = {"rounds": 5, "seed": 0}
    assert config_differences(old, {**old, "precision": 32, "data.plays": None}) == []
    assert config_differences(old, {**old, "precision": "bf16-mixed"}) == [
        "precision (32 -> 'bf16-mixed')"
    ]
