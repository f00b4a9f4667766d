"""Run folders: one writer each, no fresh run over a run's checkpoints, pruning that keeps
the run's own newest rounds, checkpoint paths checked, private files, durable renames."""

from __future__ import annotations

import stat
import subprocess
import sys
import time

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.logging import files
from fedtorch.logging.files import RunLock
from fedtorch.server import checkpoint
from fedtorch.state.client_store import ClientStateStore
from fedtorch.strategies.rows import RowStore
from tests.conftest import FAST, compose_config

HOLD_LOCK = """
import sys, time
from fedtorch.logging.files import RunLock
RunLock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"^hydra.run.dir: {tmp_path} is in use by another"):
            RunLock(tmp_path)
        with pytest.raises(ConfigError, match="in use by another run \\(pid"):
            build(compose_config([*FAST, "rounds=1"]), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    RunLock(tmp_path).release()  # free again once the holder is gone


def test_the_lock_is_reentrant_in_one_process_and_released_after_the_run(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    second.release()
    first.release()
    run = build(compose_config([*FAST, "rounds=1"]), tmp_path / "run")
    run.run()
    assert (tmp_path / "run").resolve() not in RunLock._held


def test_a_fresh_run_over_checkpoints_is_refused(tmp_path):
    build(compose_config([*FAST, "rounds=2", "checkpoint.every=1"]), tmp_path).run()
    with pytest.raises(ConfigError, match="^resume: false, but .* holds checkpoints of a run"):
        build(compose_config([*FAST, "rounds=2"]), tmp_path)
    build(compose_config([*FAST, "rounds=3", "checkpoint.every=1", "resume=true"]), tmp_path)


def test_pruning_keeps_this_runs_newest_rounds(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(checkpoint, "fsync_folder", lambda folder: synced.append(folder))
    for r in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, r, {"round": r}, keep=10)
    # Resumed from round 2: the next checkpoint is round 3; rounds 4 and 5 were another run's.
    checkpoint.save_checkpoint(tmp_path, 3, {"round": 3}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "round_000003.pt",
        "round_000002.pt",
    ]
    assert synced and all(f == tmp_path / checkpoint.CHECKPOINT_DIR for f in synced)


def test_resume_file_must_be_a_runs_checkpoint(tmp_path):
    stray = tmp_path / "model.pt"
    torch.save({}, stray)
    with pytest.raises(ConfigError, match="^resume: .*model.pt is not a checkpoint of a run"):
        build(compose_config([*FAST, f"resume={stray}"]), tmp_path / "run")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_with_client_updates_or_state_are_private(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, 1, {"round": 1}, keep=2)
    assert _mode(path) == 0o600
    rows = RowStore(4, 1000, budget_bytes=0, folder=tmp_path, device=torch.device("cpu"))
    rows.append(torch.ones(1000))
    assert rows.spilled and _mode(rows.path) == 0o600
    rows.close()
    store = ClientStateStore.in_run_folder(tmp_path, "c", 3, 5, "disk", "strategy.client_state")
    store.stage(0, torch.ones(5))
    store.commit()
    assert all(_mode(p) == 0o600 for p in (tmp_path / "client_state").iterdir())
    files.write_json(tmp_path / "summary.json", {})  # an ordinary run file stays readable
    assert _mode(tmp_path / "summary.json") & 0o044
