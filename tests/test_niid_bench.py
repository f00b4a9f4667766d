"""The NIID-Bench grid script's bookkeeping: the cells, the side runs and the seed range
used to read gaps to Flower's published figures."""

import importlib.util
import random
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "niid_bench" / "run.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("niid_bench_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cells_cover_the_grid_once_with_default_mu_first(grid):
    cells = grid.cells()
    assert len(cells) == len(set(cells)) == 5 * 7
    first_pass = cells[: 5 * 4]
    assert {a for _, a in first_pass} == {"fedavg", "scaffold", "fednova", "fedprox_mu0.01"}
    assert all(p in grid.PUBLISHED for p, _ in cells)


def test_checks_name_a_partition_and_a_variant_outside_the_grid(grid):
    for partition, name in grid.CHECKS:
        assert partition in grid.PARTITIONS
        assert name in grid.VARIANTS and name not in grid.ALGORITHMS


def test_seed_range_is_the_widest_one_run_can_lie_from_the_mean(grid):
    # The bound is reached: one run at the edge, the other two equal.
    mean, std = 82.43, 1.52
    low, high = grid.seed_range(mean, std)
    half = high - mean
    runs = [mean + half, mean - half / 2, mean - half / 2]
    assert statistics.mean(runs) == pytest.approx(mean)
    assert statistics.stdev(runs) == pytest.approx(std)
    assert mean - low == pytest.approx(half)
    # ...and never exceeded by any three runs.
    rng = random.Random(0)
    for _ in range(1000):
        runs = [rng.gauss(0, 1) for _ in range(3)]
        m, s = statistics.mean(runs), statistics.stdev(runs)
        low, high = grid.seed_range(m, s)
        assert all(low - 1e-9 <= x <= high + 1e-9 for x in runs)


def test_flowers_scaffold_c2_spread_is_one_converged_run_and_two_at_chance(grid):
    mean, std = grid.PUBLISHED["c2"]["scaffold"]
    assert statistics.mean([81.4, 10.0, 10.0]) == pytest.approx(mean)
    assert statistics.stdev([81.4, 10.0, 10.0]) == pytest.approx(std, abs=0.01)
    assert grid.seed_range(mean, std)[1] == pytest.approx(81.4, abs=0.01)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_stop_at_interrupt_reaches_runs_of_a_script_started_in_the_background():
    # A background job inherits SIGINT ignored; the runs it starts must not.
    experiments = SCRIPT.parents[1]
    probe = (
        "import signal, subprocess, sys\n"
        f"sys.path.insert(0, {str(experiments)!r})\n"
        "import common\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "common.interruptible()\n"
        "status = subprocess.run(['cat', '/proc/self/status'], capture_output=True, text=True)\n"
        "print(next(x for x in status.stdout.splitlines() if x.startswith('SigIgn')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    ignored = int(out.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGINT - 1))


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(grid, tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "RUNS", tmp_path)
    monkeypatch.setattr(grid, "write_table", lambda: None)
    ran = []

    def fake_run(overrides, out, threads, deadline):
        ran.append(out.name)
        if out.name == "fedavg":  # diverges: logs a round and a warning, then exits 2
            (out / "metrics.jsonl").write_text('{"round": 9, "test_accuracy": 0.1}\n')
            (out / "train.log").write_text(
                "[t][fedtorch][WARNING] - round 9: client 0 failed: update has NaN\n"
                "[t][fedtorch][ERROR] - error: round 10: only 0 of 2 sampled clients reported\n"
            )
            raise subprocess.CalledProcessError(2, ["fedtorch.train"])
        (out / "summary.json").write_text(
            '{"best_accuracy": 0.5, "best_round": 1, "wall_time_s": 1.0}'
        )
        return True

    monkeypatch.setattr(grid, "run_fedtorch", fake_run)
    cells = [("c1", "fedavg"), ("c1", "scaffold")]
    grid.run_grid(cells, jobs=1, threads=1, extra=[])
    assert ran == ["fedavg", "scaffold"]
    note = (tmp_path / "c1" / "fedavg" / "FAILED.md").read_text()
    assert note.startswith("failed: exit status 2 after round 9")
    assert "client 0 failed: update has NaN" in note
    assert "error: round 10: only 0 of 2 sampled clients reported" in note
    assert grid.failure("c1", "fedavg") and not grid.failure("c1", "scaffold")
    assert not (tmp_path / "c1" / "fedavg" / ".running").exists()
    grid.run_grid(cells, jobs=1, threads=1, extra=[])  # skipped until FAILED.md is deleted
    assert ran == ["fedavg", "scaffold"]
