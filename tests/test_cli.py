"""The command line end to end: a run, a sweep and its report, plug-ins, user errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import torch

from tests.conftest import FAST, FAST_NO_MODEL, REPO, run_cli

OUTPUTS = (
    "metrics.csv",
    "metrics.jsonl",
    "summary.json",
    "config.yaml",
    "model.pt",
    "metrics.png",
    "partition.json",
)


def test_single_run_writes_every_output(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [*FAST, "logger=default", "eval_clients=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "rounds: 100%" in proc.stderr  # the tqdm bar
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert all(r["test_accuracy"] and r["client_accuracy_worst10"] for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_accuracy"] > 0.5  # synthetic task is learnable in 3 rounds
    assert summary["bytes_up"] == summary["bytes_down"] > 0
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert set(state) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}


def test_sweep_and_report(tmp_path):
    proc = run_cli(
        [
            "-m",
            *FAST,
            "rounds=2",
            "client.optimizer.lr=0.01,0.2",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(runs) == 4
    report = subprocess.run(
        [sys.executable, "-m", "fedtorch.report", str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    lines = [ln for ln in report.stdout.splitlines() if ln.startswith("| client")]
    assert len(lines) == 2 and all("| 2 |" in ln for ln in lines)
    assert "±" in lines[0]
    assert (tmp_path / "sweep" / "report.png").is_file()


def test_plugin_model_dataset_partitioner_strategy(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            *FAST_NO_MODEL,
            "model._target_=tests.plugins.TinyNet",
            "+model.in_features=4",
            "data._target_=tests.plugins.blobs",
            "partition._target_=tests.plugins.first_half_split",
            "strategy._target_=tests.plugins.HalfStepFedAvg",
            "+strategy.step=0.5",
            "rounds=8",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    # Keys of the replaced default options are dropped with a warning, not passed on.
    assert "ignoring data.num_train" in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "blobs"
    assert summary["partition"]["assigned_samples"] == 240  # half of 480 training samples
    assert summary["best_accuracy"] > 0.9


def test_plugin_dataset_as_torch_datasets(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            *FAST,
            "model=mlp",
            "data._target_=tests.plugins.tensor_datasets",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["dataset"] == "TensorDataset"


def test_user_config_folder_via_searchpath(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            *FAST_NO_MODEL,
            "model=tiny",
            f"hydra.searchpath=[file://{REPO / 'tests' / 'user_configs'}]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TinyNet" in (run_dir / "config.yaml").read_text()


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = run_cli(
        [*FAST, "partition=dirichlet", "partition.alpha=-1", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: partition.alpha: must be > 0, got -1"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "metrics.csv").exists()  # failed before training
    log = (tmp_path / "r" / "train.log").read_text()  # the run folder says why it stopped
    assert log.rstrip().endswith("[ERROR] - error: partition.alpha: must be > 0, got -1")
    full = run_cli(
        [*FAST, "partition=dirichlet", "partition.alpha=-1", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
        env={"FEDTORCH_FULL_ERROR": "1"},
    )
    assert "Traceback" in full.stderr
