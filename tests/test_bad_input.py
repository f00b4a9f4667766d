"""Every entry of the bad-input table fails before training with its one-line message."""

from __future__ import annotations

import pytest

from fedtorch.config.build import build, resume_target
from fedtorch.config.hydra_errors import precheck
from fedtorch.errors import FedtorchError
from tests.bad_inputs import CASES
from tests.conftest import FAST, REPO, compose_config, run_cli
from tests.test_data import write_mnist_like


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist_like(root / "truncated")
    path = root / "truncated" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    write_mnist_like(root / "magic", gz=False)
    path = root / "magic" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    return root


def error_line(overrides: list[str], run_dir) -> str:
    """What ``python -m fedtorch.train OVERRIDES`` prints after ``error: ``."""
    try:
        precheck(overrides)
        cfg = compose_config(overrides)
        resumed, _ = resume_target(cfg)  # as train() does: resume=PATH runs in PATH
        build(cfg, resumed or run_dir)
    except FedtorchError as exc:
        return str(exc)
    raise AssertionError(f"{overrides} was accepted")


@pytest.mark.parametrize(("what", "overrides", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_message(tmp_path, data, what, overrides, message):
    fill = {"{data}": str(data), "{tmp}": str(tmp_path)}
    for key, value in fill.items():
        overrides = [o.replace(key, value) for o in overrides]
        message = message.replace(key, value)
    line = error_line([*FAST, *overrides], tmp_path / "run")
    assert line.startswith(message), line
    assert "\n" not in line
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_table_has_enough_entries_and_is_in_the_readme():
    assert len(CASES) >= 25
    readme = (REPO / "README.md").read_text()
    missing = [what for what, _, _ in CASES if f"| {what} |" not in readme]
    assert not missing, f"README bad-input table lacks: {missing}"


def test_an_unknown_option_lists_the_group_options_and_nothing_else(tmp_path):
    strategies = sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml"))
    line = error_line([*FAST, "strategy=fedfoo"], tmp_path / "run")
    assert line == f"strategy: no option 'fedfoo'; choose from {', '.join(strategies)}"
    presets = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
    line = error_line([*FAST, "+experiment=nope"], tmp_path / "run")
    assert line == f"experiment: no option 'nope'; choose from {', '.join(presets)}"


def test_hydra_level_mistakes_are_one_line_on_the_command_line(tmp_path):
    for args, expected in (
        (["strategy=fedfoo"], "error: strategy: no option 'fedfoo'; choose from"),
        (["rounds_typo=3"], "error: rounds_typo: no such key"),
        (["hydra.run.dir=/dev/null/x"], "error: hydra.run.dir: cannot create the output folder"),
    ):
        proc = run_cli([*FAST, *args], cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
