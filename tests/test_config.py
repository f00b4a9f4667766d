"""The config tree: every preset and group option composes; it loads from anywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import get_object

from tests.conftest import REPO, compose_config

CONFIGS = REPO / "configs"
GROUPS = (
    *("model", "dataset", "partition", "strategy", "client", "engine", "attack", "privacy"),
    *("logger", "experiment"),
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("experiment"))
def test_every_preset_composes(name):
    cfg = compose_config([f"+experiment={name}"])
    natural = cfg.partition._target_.endswith(".natural")
    assert cfg.rounds >= 1 and (cfg.num_clients >= 1 if not natural else cfg.num_clients is None)
    for group in ("model", "data", "partition", "strategy", "client", "engine", "logger"):
        get_object(cfg[group]._target_)  # every _target_ imports


@pytest.mark.parametrize(("group", "name"), [(g, n) for g in GROUPS[:-1] for n in options(g)])
def test_every_group_option_composes(group, name):
    cfg = compose_config([f"{group}={name}"])
    node = cfg.data if group == "dataset" else cfg[group]
    assert "_target_" in node
    get_object(node._target_)


def test_readme_lists_every_option_of_every_group():
    """The README's "Groups and options" table names each option file in configs/."""
    rows = {
        line.split("`")[1]: line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("| `")
    }
    missing = [
        f"{group}={name}"
        for group in (*GROUPS, "paths", "hydra", "hparams_search")
        for name in options(group)
        if f"`{name}`" not in rows.get(group, "")
    ]
    assert not missing, f"README's groups table lacks: {missing}"


def test_presets_match_their_papers():
    noniid = compose_config(["+experiment=mnist_noniid"])
    assert noniid.model._target_.endswith("McMahanCNN")
    assert (noniid.num_clients, noniid.clients_per_round) == (100, 10)
    assert noniid.partition._target_.endswith("shards") and noniid.partition.shards_per_client == 2
    assert (noniid.client.epochs, noniid.client.batch_size) == (5, 10)
    niid = compose_config(["+experiment=fmnist_dirichlet"])
    assert niid.model._target_.endswith("SimpleCNN") and niid.partition.alpha == 0.5
    assert (niid.rounds, niid.num_clients, niid.clients_per_round) == (50, 10, None)
    assert (niid.client.epochs, niid.client.batch_size) == (10, 64)
    opt = niid.client.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.01, 0.9, 1e-5)


def test_command_line_beats_preset():
    cfg = compose_config(["+experiment=mnist_noniid", "dataset=fashion_mnist", "data.root=/x"])
    assert cfg.data._target_.endswith("fashion_mnist") and cfg.data.root == "/x"


def test_config_loads_from_any_working_directory(tmp_path):
    """Run the real entry point from a folder that has no configs in it."""
    out = subprocess.run(
        [sys.executable, "-m", "fedtorch.train", "+experiment=quickstart", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "fedtorch.data.datasets.fashion_mnist" in out.stdout


def test_config_loads_from_built_wheel(tmp_path):
    """Build a wheel, install it into a bare folder, and compose from outside the repo."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("fedtorch-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    located = subprocess.run(
        [sys.executable, "-c", "import fedtorch; print(fedtorch.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert located.stdout.startswith(str(site)), located
    out = subprocess.run(
        [sys.executable, "-m", "fedtorch.train", "+experiment=mnist_noniid", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "McMahanCNN" in out.stdout
