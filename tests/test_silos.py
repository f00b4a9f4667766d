"""data.silos: each silo's clients come from its own files; under engine=distributed each
process loads only its silo, and the run equals the one-process simulation bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.server.evaluation import evaluate
from fedtorch.train import train
from tests.conftest import REPO, compose_config, run_cli
from tests.test_data import idx_bytes
from tests.test_resume import assert_same


def write_silo(folder: Path, seed: int, n_train: int, n_test: int = 20) -> None:
    """Fashion-MNIST-like IDX files with this silo's own random images and labels."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    parts = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=gen),
        "train-labels-idx1-ubyte": torch.randint(0, 10, (n_train,), generator=gen),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=gen),
        "t10k-labels-idx1-ubyte": torch.randint(0, 10, (n_test,), generator=gen),
    }
    for name, array in parts.items():
        (folder / name).write_bytes(idx_bytes(array))


@pytest.fixture(scope="module")
def silos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("silos")
    write_silo(root / "a", seed=1, n_train=60)
    write_silo(root / "b", seed=2, n_train=80, n_test=30)
    return root


def overrides(root: Path, record: Path | None = None) -> list[str]:
    data = ["dataset=fashion_mnist", "data.download=false", "data.search_paths=[]"]
    if record is not None:
        data += ["data._target_=tests.plugins.recorded_fashion_mnist", f"+data.record={record}"]
    return [
        *data,
        f"data.silos=[{{root: {root / 'a'}, num_clients: 2}},"
        f" {{root: {root / 'b'}, num_clients: 3}}]",
        "num_clients=null",
        "partition=iid",
        "model=mlp",
        "model.hidden=[16]",
        "rounds=3",
        "clients_per_round=4",
        "client.optimizer.lr=0.05",
        "logger=quiet",
        "device=cpu",
        "torch_threads=1",
    ]


def test_one_process_loads_every_silo_and_numbers_clients_silo_by_silo(tmp_path, silos):
    orch = build(compose_config(overrides(silos)), tmp_path)
    assert orch.silos.client_silo == [0, 0, 1, 1, 1]
    assert [len(s) for s in orch.shards[:2]] == [30, 30] and sum(map(len, orch.shards)) == 140
    assert all(int(s.max()) < 60 for s in orch.shards[:2])  # silo a's rows come first
    assert all(int(s.min()) >= 60 for s in orch.shards[2:])
    # Federated evaluation pools the silos' test splits: here the same as all 50 rows at once.
    pooled = orch._evaluate()
    loss, acc = evaluate(orch.model, orch.data.test_x, orch.data.test_y, 2048, orch.data.task)
    assert len(orch.data.test_y) == 50 and pooled["test_accuracy"] == acc
    assert pooled["test_loss"] == pytest.approx(loss, rel=1e-6)


def launch_node(silo: int, args: list[str], cwd: Path, port: int) -> subprocess.Popen:
    """One machine of a two-machine run: fedtorch-run with a c10d rendezvous, one process,
    serving ``silo``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtorch.launch",
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--",
            *args,
            f"distributed.silo={silo}",
        ],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "SILO_TAG": str(silo)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(args: list[str], cwd: Path, silos_served=(0, 1)) -> list[tuple[int, str]]:
    port = free_port()
    nodes = [launch_node(s, args, cwd, port) for s in silos_served]
    return [(node.wait(timeout=240), node.stdout.read()) for node in nodes]


def test_each_process_reads_only_its_silo_and_matches_one_process(tmp_path, silos):
    reference = tmp_path / "one"
    done = run_cli([*overrides(silos), f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = tmp_path / "reads"
    run_dir = tmp_path / "two"
    ended = two_machines([*overrides(silos, record), f"hydra.run.dir={run_dir}"], tmp_path)
    assert all(code == 0 for code, _ in ended), ended[0][1][-3000:] + ended[1][1][-3000:]
    assert_same(run_dir, reference)
    reads = [line.split() for f in record.iterdir() for line in f.read_text().splitlines()]
    assert sorted(reads) == [["0", str(silos / "a")], ["1", str(silos / "b")]]


@pytest.mark.slow
def test_a_silo_served_twice_stops_every_process(tmp_path, silos):
    ended = two_machines(
        [*overrides(silos), f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, silos_served=(0, 0)
    )
    for code, output in ended:
        assert code != 0
        assert "distributed.silo: every one of the 2 silos needs exactly one process" in output


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        (["distributed.silo=0"], "distributed.silo", "leave it null"),
        (["num_clients=7"], "num_clients", "their total 5"),
        (["data.silos=[{root: x}]"], "data.silos.0.num_clients", "partition=natural"),
        (["data.silos=[{roots: x, num_clients: 2}]"], "data.silos.0.roots", "not a data key"),
        (["data.silos=[]"], "data.silos", "non-empty list"),
        (["eval_local=true"], "eval_local", "data.silos"),
    ],
)
def test_bad_silo_settings_stop_before_training(tmp_path, silos, extra, key, says):
    cfg = compose_config([*overrides(silos), *extra])
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path)
    assert info.value.key == key and says in str(info.value)
