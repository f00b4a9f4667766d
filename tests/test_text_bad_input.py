"""Every entry of the dataset=text bad-input table fails before training with its one
line, and the README lists it; an override under a group's name gets the right prefix."""

from __future__ import annotations

import pytest

from tests.bad_inputs import CASES as GENERAL_CASES
from tests.conftest import REPO
from tests.test_bad_input import error_line
from tests.text_bad_inputs import BASE, CASES
from tests.text_fixtures import (
    classification_rows,
    instruction_rows,
    make_tokenizer,
    write_jsonl,
)

datasets = pytest.importorskip("datasets", reason="dataset=text needs the llm extra")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rows = classification_rows(6)
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
    long_text = " ".join(["the big red dog"] * 5)
    (root / "empty.jsonl").write_text("\n")
    return {
        "{rows}": write_jsonl(root / "rows.jsonl", rows),
        "{alpaca}": write_jsonl(root / "alpaca.jsonl", instruction_rows(12)),
        "{chat}": write_jsonl(root / "chat.jsonl", [{"messages": chat}] * 4),
        "{long}": write_jsonl(root / "long.jsonl", [{**r, "text": long_text} for r in rows]),
        "{one_label}": write_jsonl(root / "one.jsonl", [{**r, "label": "animal"} for r in rows]),
        "{empty}": root / "empty.jsonl",
        "{tok}": make_tokenizer(root / "tok", cls=True),
        "{no_pad}": make_tokenizer(root / "no_pad", pad=False, cls=True),
    }


@pytest.mark.parametrize(("what", "overrides", "message"), CASES, ids=[c[0] for c in CASES])
def test_text_bad_input_gets_its_message(tmp_path, files, monkeypatch, what, overrides, message):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill = {**{k: str(v) for k, v in files.items()}, "{tmp}": str(tmp_path)}
    args = [*BASE, *overrides]
    for key, value in fill.items():
        args = [a.replace(key, value) for a in args]
        message = message.replace(key, value)
    line = error_line(args, tmp_path / "run")
    assert line.startswith(message), line
    assert "\n" not in line
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_the_readme_lists_every_text_bad_input():
    readme = (REPO / "README.md").read_text()
    missing = [what for what, _, _ in CASES if f"| {what} |" not in readme]
    assert not missing, f"README bad-input table lacks: {missing}"


def test_a_group_key_names_where_the_groups_keys_live(tmp_path):
    assert any(o == ["dataset._target_=mypkg.load"] for _, o, _ in GENERAL_CASES)
    line = error_line(["dataset.files=rows.jsonl"], tmp_path / "run")
    assert line == (
        "dataset.files: no such key: the dataset group's keys are under data. (set "
        "data.files=VALUE; pick an option with dataset=NAME)"
    )
    line = error_line(["experiment.rounds=3"], tmp_path / "run")
    assert (
        line
        == "experiment.rounds: no such key: a preset's keys are top-level keys (set rounds=VALUE)"
    )
