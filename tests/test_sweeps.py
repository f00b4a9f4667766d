"""Hydra's Optuna sweeper and joblib launcher with fedtorch, and the report on their folders.

Each sweep is a subprocess of ``python -m fedtorch.train`` on the synthetic task, two
rounds a run, so the whole file stays within a few tens of seconds on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedtorch import report
from fedtorch.config.hydra_errors import precheck
from fedtorch.errors import ConfigError
from tests.conftest import FAST, run_cli

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs fedtorch[sweep]")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs fedtorch[sweep]")

# The searches set the learning rates, so the fast overrides must leave them alone.
SMALL = [o for o in FAST if not o.startswith("client.optimizer.lr=")] + [
    "rounds=2",
    "torch_threads=1",
]

PRESET = Path(__file__).resolve().parents[1] / "configs" / "hparams_search" / "fedadam_lr.yaml"
# The preset's search over three client learning rates, one of which diverges (every
# client's update is NaN, so round 1 ends with no client reporting), drawn by a seeded
# random sampler. Not the grid sampler: when the grid's last trial fails, Optuna 2.10's
# grid sampler calls Study.stop outside an objective and the sweep ends with a RuntimeError.
DIVERGING = """\
# @package _global_
defaults:
  - override /strategy: fedadam
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: random
hydra:
  mode: MULTIRUN
  sweeper:
    sampler:
      seed: 2  # draws lr 1e6, 0.05, 0.2: the diverging trial first
    direction: maximize
    n_trials: 3
    n_jobs: 1
    max_failure_rate: 1.0
    params:
      client.optimizer.lr: choice(0.05, 0.2, 1e6)
      strategy.server_lr: choice(0.01)
"""


def _runs(sweep_dir: Path) -> dict[str, dict]:
    """Run folder name -> {overrides, summary (None if the run has none)}."""
    runs = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        summary = run_dir / "summary.json"
        runs[run_dir.name] = {
            "overrides": yaml.safe_load(overrides_file.read_text()),
            "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        }
    return runs


def _report(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert report.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "report.md").is_file()
    return capsys.readouterr().out


def _search(sweep_dir: Path, cwd: Path, *extra: str) -> None:
    """The preset's search, two trials handed to the launcher as one batch."""
    proc = run_cli(
        [
            "+hparams_search=fedadam_lr",
            *SMALL,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            *extra,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr


def _assert_same_runs(ours: Path, theirs: Path) -> dict[str, dict]:
    """Both sweep folders hold the same runs (overrides), with the same numbers and
    bit-identical final models; returns ``theirs``'s runs."""
    our_runs, their_runs = _runs(ours), _runs(theirs)
    assert sorted(our_runs) == sorted(their_runs) == ["0", "1"]
    for name, run in their_runs.items():
        assert our_runs[name]["overrides"] == run["overrides"]
        for key in ("final_accuracy", "best_accuracy", "best_round", "bytes_up"):
            assert our_runs[name]["summary"][key] == run["summary"][key], key
        a = torch.load(ours / name / "model.pt", weights_only=True)
        b = torch.load(theirs / name / "model.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b)
    # Two different runs, so equal folders are not two copies of one run.
    assert their_runs["0"]["summary"] != their_runs["1"]["summary"]
    return their_runs


@pytest.mark.slow  # about 35 s; `make test-full`
def test_optuna_preset_with_joblib_equals_the_basic_launcher(tmp_path, capsys):
    """The preset's trials run two at a time by joblib: the sampler proposes the same
    trials (seeded) and each trial's numbers equal those of the basic launcher, one after
    the other; the best value is the best trial's best accuracy."""
    _search(tmp_path / "joblib", tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    _search(tmp_path / "basic", tmp_path)
    runs = _assert_same_runs(tmp_path / "joblib", tmp_path / "basic")
    results = yaml.safe_load((tmp_path / "joblib" / "optimization_results.yaml").read_text())
    assert results == yaml.safe_load((tmp_path / "basic" / "optimization_results.yaml").read_text())
    best_name = max(runs, key=lambda name: runs[name]["summary"]["best_accuracy"])
    assert results["best_value"] == runs[best_name]["summary"]["best_accuracy"]
    assert set(results["best_params"]) == {"client.optimizer.lr", "strategy.server_lr"}
    for key, value in results["best_params"].items():
        assert f"{key}={value}" in runs[best_name]["overrides"]
    config = yaml.safe_load((tmp_path / "joblib" / best_name / "config.yaml").read_text())
    assert config["strategy"]["_target_"].endswith("FedAdam")
    assert config["strategy"]["server_lr"] == results["best_params"]["strategy.server_lr"]

    out = _report(tmp_path / "joblib", capsys)
    assert sum(line.startswith("| client.optimizer.lr=") for line in out.splitlines()) == 2
    assert f"Optuna best: {results['best_value']} with " in out
    assert out.split("Optuna best: ", 1)[1].splitlines()[0].endswith(f"(run {best_name})")


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
def test_optuna_diverged_trial_fails_and_the_search_goes_on(tmp_path, capsys):
    preset = yaml.safe_load(PRESET.read_text())["hydra"]["sweeper"]
    assert preset["max_failure_rate"] == 1.0 and preset["direction"] == "maximize"
    configs = tmp_path / "configs"
    (configs / "hparams_search").mkdir(parents=True)
    (configs / "hparams_search" / "diverging.yaml").write_text(DIVERGING)
    sweep_dir = tmp_path / "search"
    proc = run_cli(
        [
            "+hparams_search=diverging",
            *SMALL,
            f"hydra.searchpath=[file://{configs}]",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Failed experiment: round 1: only 0 of 5 sampled clients reported" in proc.stdout
    runs = _runs(sweep_dir)
    assert len(runs) == 3
    failed = [name for name, run in runs.items() if run["summary"] is None]
    assert len(failed) == 1 and "client.optimizer.lr=1000000.0" in runs[failed[0]]["overrides"]
    assert "error: round 1: only 0" in (sweep_dir / failed[0] / "train.log").read_text()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    finished = [r["summary"]["best_accuracy"] for r in runs.values() if r["summary"]]
    assert results["best_value"] == max(finished)
    assert results["best_params"]["client.optimizer.lr"] in (0.05, 0.2)

    out = _report(sweep_dir, capsys)
    assert "1 run(s) without summary.json:" in out
    assert f"- {failed[0]}: round 1: only 0 of 5 sampled clients reported" in out


@pytest.mark.slow
def test_joblib_grid_equals_the_basic_launcher(tmp_path, capsys):
    """A plain -m sweep run two at a time by joblib equals the same sweep run one after
    the other, and the report reads its folder."""
    sweep = ["-m", *SMALL, "seed=0,1", "client.optimizer.lr=0.05"]
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    parallel = run_cli([*sweep, *joblib, f"hydra.sweep.dir={tmp_path / 'joblib'}"], cwd=tmp_path)
    assert parallel.returncode == 0, parallel.stderr
    assert "Joblib.Parallel(n_jobs=2" in parallel.stdout
    serial = run_cli([*sweep, f"hydra.sweep.dir={tmp_path / 'basic'}"], cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr
    _assert_same_runs(tmp_path / "joblib", tmp_path / "basic")
    out = _report(tmp_path / "joblib", capsys)
    assert "| (all runs) | 2 |" in out
    assert "without summary.json" not in out and "Optuna" not in out


def test_unknown_sweeper_names_the_extra():
    """A sweeper or launcher Hydra does not know (its plugin not installed, or a typo) is
    one line that lists the installed ones and names the extra, in a multirun too.
    (Without the plugins at all the line reads ``choose from basic (...)``.)"""
    with pytest.raises(ConfigError) as caught:
        precheck(["-m", "hydra/launcher=jobllib", "seed=0,1"])
    message = str(caught.value)
    assert message.startswith("hydra/launcher: no option 'jobllib'; choose from basic, joblib")
    assert message.endswith(
        '(Optuna sweeper, joblib and submitit launchers: pip install "fedtorch[sweep]")'
    )
