"""engine=distributed under torchrun (gloo on 127.0.0.1): bit-identical to one process
whatever the world size, restarts after a crash, hung ranks, mismatched ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.launch import command
from tests.conftest import FAST, REPO, compose_config, run_cli
from tests.test_resume import assert_same, outcome

# Five clients all sampled: with chunks of one client, three ranks do not divide the cohort.
RUN = [*FAST, "torch_threads=1", "checkpoint.every=1"]
STRATEGIES = {
    "fedavg": ["strategy=fedavg"],
    "fedadam": ["strategy=fedadam", "strategy.server_lr=0.01"],
    "scaffold": ["strategy=scaffold"],
    "krum": ["strategy=krum", "strategy.num_byzantine=1"],
}
SLOW = "tests.conftest.SlowEvalMLP"  # 0.3 s a round: room to signal mid-run


def fedtorch_run(nproc: int, overrides: list[str], cwd: Path, *launcher: str, timeout=240):
    """``fedtorch-run --nproc_per_node=NPROC LAUNCHER -- OVERRIDES`` in a subprocess."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtorch.launch",
            f"--nproc_per_node={nproc}",
            *launcher,
            "--",
            *overrides,
        ],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class References(dict):
    """One-process runs (sequential engine), one per strategy, each made when first asked."""

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.factory = tmp_path_factory

    def __missing__(self, name: str) -> Path:
        run_dir = self.factory.mktemp(f"ref-{name}")
        done = run_cli([*RUN, *STRATEGIES[name], f"hydra.run.dir={run_dir}"], cwd=run_dir)
        assert done.returncode == 0, done.stderr[-2000:]
        self[name] = run_dir
        return run_dir


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> References:
    return References(tmp_path_factory)


# The default suite runs FedAvg on two ranks and SCAFFOLD (per-client state sent out with
# the tasks) on three, which does not divide the cohort; the rest (one rank included) is slow.
DEFAULT_CASES = {("fedavg", 2), ("scaffold", 3)}
CASES = [
    pytest.param(
        name,
        world,
        marks=[] if (name, world) in DEFAULT_CASES else [pytest.mark.slow],
    )
    for name in STRATEGIES
    for world in (1, 2, 3)
]


@pytest.mark.parametrize(("strategy", "world"), CASES)
def test_bit_identical_to_one_process(tmp_path, references, strategy, world):
    run_dir = tmp_path / "run"
    done = fedtorch_run(world, [*RUN, *STRATEGIES[strategy], f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(run_dir, references[strategy])
    written = sorted(p.name for p in run_dir.iterdir())
    assert written == sorted(p.name for p in references[strategy].iterdir())


def test_a_rank_killed_mid_round_is_restarted_and_the_run_ends_the_same(tmp_path):
    overrides = [*RUN, "rounds=4", "model._target_=tests.conftest.CrashOnceMLP"]
    reference = tmp_path / "reference"
    done = run_cli([*overrides, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    done = fedtorch_run(2, [*overrides, f"hydra.run.dir={run_dir}"], tmp_path, "--max_restarts=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restart 1: resuming from the newest checkpoint" in done.stdout + done.stderr
    assert_same(run_dir, reference)


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
def test_a_hung_rank_stops_every_rank_with_its_name(tmp_path):
    overrides = [*RUN, "model._target_=tests.conftest.SleepyRank1MLP", "distributed.timeout_s=4"]
    done = fedtorch_run(2, [*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    assert "error: distributed: round 1: rank 1 did not deliver the updates" in done.stderr


def test_ranks_with_different_configs_stop_at_start_up(tmp_path):
    done = fedtorch_run(2, [*RUN, "seed=${oc.env:RANK}", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert done.returncode != 0
    assert "error: distributed: rank(s) 1 composed a different config from rank 0's" in (
        done.stderr
    )
    assert not (tmp_path / "metrics.csv").exists()


def test_another_engine_under_torchrun_is_refused(tmp_path):
    done = fedtorch_run(2, [*RUN, "engine=sequential", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert done.returncode != 0
    assert "error: engine: launched as 2 processes, but engine=" in done.stderr


def test_distributed_engine_without_torchrun_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="^engine: engine=distributed runs under torchrun"):
        build(compose_config([*FAST, "engine=distributed"]), tmp_path)


def test_launcher_command_line():
    assert command(["--nproc_per_node=2", "--", "+experiment=quickstart"])[:5] == [
        "--standalone",
        "--nproc_per_node=2",
        "--module",
        "fedtorch.train",
        "engine=distributed",
    ]
    multi = command(["--nnodes=2", "--rdzv_endpoint=host:29400", "--", "engine=distributed"])
    assert multi[0] == "--nnodes=2" and multi.count("engine=distributed") == 1
    assert multi[-1].startswith("hydra.run.dir=${paths.output_dir}/runs/")
    assert command(["--", "hydra.run.dir=/x"])[-1] == "hydra.run.dir=/x"


@pytest.mark.slow
def test_resume_on_another_number_of_processes_ends_the_same(tmp_path, references):
    run_dir = tmp_path / "run"
    first = [*RUN, *STRATEGIES["scaffold"], "rounds=2", f"hydra.run.dir={run_dir}"]
    done = fedtorch_run(2, first, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rest = [*RUN, *STRATEGIES["scaffold"], f"resume={run_dir}", "resume_force=true"]
    done = fedtorch_run(3, rest, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(run_dir, references["scaffold"])


@pytest.mark.slow  # default-suite time; the allreduce path's refusals stay in the default suite
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_allreduce_equals_one_process_within_float_tolerance(tmp_path, references, strategy):
    run_dir = tmp_path / "run"
    overrides = [*RUN, *STRATEGIES[strategy], "aggregation.collective=allreduce"]
    done = fedtorch_run(3, [*overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    model, rows = outcome(run_dir)
    ref_model, ref_rows = outcome(references[strategy])
    assert all(torch.allclose(model[k], ref_model[k], atol=1e-6) for k in ref_model)
    assert [r["clients"] for r in rows] == [r["clients"] for r in ref_rows]
    assert [r["test_accuracy"] for r in rows] == pytest.approx(
        [r["test_accuracy"] for r in ref_rows], abs=0.005
    )


@pytest.fixture
def one_rank_group():
    """A world of one process (rank 0), so engine=distributed builds in this process."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "extra", [["strategy=krum"], ["compression=topk"], ["privacy=dp_central"], ["attack=sign_flip"]]
)
def test_allreduce_refuses_what_needs_every_update(tmp_path, one_rank_group, extra):
    cfg = compose_config([*FAST, "engine=distributed", "aggregation.collective=allreduce", *extra])
    with pytest.raises(ConfigError, match="^aggregation.collective: allreduce sums updates"):
        build(cfg, tmp_path)


def test_sigterm_checkpoints_on_every_rank_and_prints_the_resume_command(tmp_path):
    import signal

    from tests.test_resume import wait_for_rows

    overrides = [*RUN, "rounds=8", "checkpoint.every=100", "model._target_=" + SLOW]
    reference = tmp_path / "reference"
    done = run_cli([*overrides, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtorch.launch",
            "--nproc_per_node=2",
            "--",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_rows(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends torchrun before killing it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("resume with: ")]
    assert lines, stderr[-3000:]
    line = lines[0]
    assert line.startswith("resume with: fedtorch-run --nproc_per_node=2 -- ")
    args = line.removeprefix("resume with: fedtorch-run --nproc_per_node=2 -- ").split()
    done = fedtorch_run(3, args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(run_dir, reference)
