"""Training language models on text: the round-wise cosine learning rate, evaluation
memory and its cap, per-client language-model metrics, the communication budget and the
FlowerTune preset on a tiny Llama folder."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.data.tasks import LanguageModel
from fedtorch.errors import ConfigError
from tests.conftest import FAST, compose_config
from tests.text_fixtures import instruction_rows, make_llama, write_jsonl


def test_cosine_learning_rate_by_round_and_exact_resume(tmp_path):
    overrides = [
        *FAST,
        "rounds=4",
        "client.lr_schedule=cosine",
        "client.lr_min=0.01",
        "checkpoint.every=2",
        "checkpoint.keep=2",
    ]
    full = build(compose_config(overrides), tmp_path / "a")
    trainer = full.trainer
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * r / 4)) / 2 for r in (1, 2, 3, 4)]
    assert trainer.learning_rates(4) == [pytest.approx(0.01)]
    assert [trainer.learning_rates(r)[0] for r in (1, 2, 3, 4)] == pytest.approx(expected)
    full.run()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [row["lr"] for row in rows] == pytest.approx(expected)
    # The same run stopped after round 2 and resumed ends with the same weights.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "round_000004.pt").unlink()
    resumed = build(compose_config([*overrides, "resume=true"]), tmp_path / "b")
    resumed.run()
    for key, value in full.global_state.items():
        assert torch.equal(value, resumed.global_state[key]), key


def test_a_learning_rate_schedule_is_refused_where_it_cannot_apply(tmp_path):
    for extra, key in (
        (["client.lr_schedule=linear"], "client.lr_schedule: must be one of constant, cosine"),
        (["client.lr_schedule=cosine", "client.lr_min=1.0"], "client.lr_min: must be in [0,"),
        (["client.lr_schedule=cosine", "engine=vectorized"], "client.lr_schedule: cosine sets"),
    ):
        with pytest.raises(ConfigError) as err:
            build(compose_config([*FAST, *extra]), tmp_path / "run")
        assert str(err.value).startswith(key), str(err.value)


def test_language_model_evaluation_batches_fit_the_memory_budget():
    task = LanguageModel(pad=-100)
    inputs = torch.zeros(10, 512, dtype=torch.long)
    # 512 tokens x 32,000 outputs x 4 bytes = 62.5 MiB a row: 16 rows in 1 GiB.
    assert task.evaluation_rows(2048, inputs, 32_000, 1024) == 16
    assert task.evaluation_rows(8, inputs, 32_000, 1024) == 8
    assert task.evaluation_rows(2048, inputs, 32_000, 1) == 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("models") / "llama")


def lm_overrides(tmp_path, llama, rows=24):
    files = write_jsonl(tmp_path / "alpaca.jsonl", instruction_rows(rows))
    return [
        "dataset=text",
        f"data.files={files}",
        f"data.tokenizer={llama}",
        f"data.cache_dir={tmp_path}/cache",
        "model=hf",
        f"model.name_or_path={llama}",
        "model.config=null",
        "client.batch_size=4",
        "client.steps=2",
        "num_clients=3",
        "rounds=1",
        "device=cpu",
        "logger=quiet",
        "checkpoint.every=0",
    ]


def test_evaluation_is_the_same_in_small_batches_and_capped_when_asked(tmp_path, llama, caplog):
    base = lm_overrides(tmp_path, llama, rows=40)
    big = build(compose_config(base), tmp_path / "big")
    small = build(compose_config([*base, "eval_memory_mb=0.01"]), tmp_path / "small")
    assert small.evaluator.batch_size == 1 and big.evaluator.batch_size == 2048
    state = big.global_state
    a, b = big.evaluator.evaluate(state), small.evaluator.evaluate(state)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)
    with caplog.at_level(logging.INFO, logger="fedtorch"):
        capped = build(
            compose_config([*base, "eval_memory_mb=0.01", "eval_max_batches=2"]), tmp_path / "c"
        )
    assert len(capped.evaluator.data.test_y) == 2
    assert "at most eval_max_batches=2 batches of 1 rows: the first 2 of the 4" in caplog.text
    assert "evaluation: batches of 1 rows" in caplog.text


def test_per_client_language_model_metrics(tmp_path, llama):
    orch = build(compose_config([*lm_overrides(tmp_path, llama), "eval_clients=true"]), tmp_path)
    metrics = orch.evaluator.evaluate(orch.global_state)
    assert metrics["client_loss_worst10"] >= metrics["client_loss_mean"] > 0
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))


def test_the_communication_budget_stops_the_run_with_a_line(tmp_path, caplog):
    orch = build(compose_config([*FAST, "rounds=5", "communication_budget_mb=0.02"]), tmp_path)
    with caplog.at_level(logging.INFO, logger="fedtorch"):
        summary = orch.run()
    # The MLP's 5 clients move 2 x 5 x 3.6 kB a round: 0.02 MB is reached in round 1.
    assert summary["rounds_completed"] == 1 and summary["communication_budget_reached"]
    assert "reaches communication_budget_mb=0.02; stopping" in caplog.text
    with pytest.raises(ConfigError, match="communication_budget_mb: must be null or a number"):
        build(compose_config([*FAST, "communication_budget_mb=-1"]), tmp_path / "x")


def test_the_flowertune_preset_runs_on_the_cpu_with_a_small_llama(tmp_path, llama):
    files = write_jsonl(tmp_path / "alpaca.jsonl", instruction_rows(40, clients=1))
    cfg = compose_config(
        [
            "+experiment=flowertune",
            f"data.files={files}",
            f"model.name_or_path={llama}",
            f"data.cache_dir={tmp_path}/cache",
            "data.sequence_length=64",
            "rounds=2",
            "client.steps=2",
            "client.batch_size=4",
            "device=cpu",
            "logger=quiet",
        ]
    )
    assert cfg.adapter.r == 32 and cfg.client.lr_schedule == "cosine"
    assert cfg.num_clients == 20 and cfg.fraction == 0.1 and cfg.data.tokenizer == str(llama)
    orch = build(cfg, tmp_path / "run")
    assert orch.settings.clients_per_round == 2
    summary = orch.run()
    assert summary["rounds_completed"] == 2
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
