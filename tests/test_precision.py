"""Gradient accumulation gives the whole-batch update; mixed precision is checked early."""

from __future__ import annotations

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from tests.conftest import FAST, compose_config
from tests.shakespeare_fixture import write_plays

LM = [
    "dataset=shakespeare",
    "data.sequence_length=16",
    "data.train_fraction=0.5",
    "model=char_lstm",
    "model.hidden_size=16",
    "model.num_layers=1",
    "partition=natural",
    "rounds=2",
    "clients_per_round=3",
    "client.batch_size=4",
    "client.optimizer.lr=0.5",
    "device=cpu",
    "logger=quiet",
]


def final_vector(tmp_path, name, overrides):
    orch = build(compose_config(overrides), tmp_path / name)
    orch.run()
    return orch.global_vector


@pytest.mark.parametrize("accum", [2, 3])
def test_micro_batches_give_the_whole_batch_update_for_classification(tmp_path, accum):
    base = [*FAST, "client.batch_size=10", "client.optimizer.momentum=0.9"]
    whole = final_vector(tmp_path, "whole", base)
    split = final_vector(tmp_path, "split", [*base, f"client.grad_accum_steps={accum}"])
    assert torch.allclose(whole, split, atol=1e-6)


def test_micro_batches_weigh_a_language_model_by_tokens(tmp_path):
    """Micro-batches hold different numbers of non-pad targets: weighting each by its
    tokens (not 1/accum) is what reproduces the whole batch."""
    write_plays(tmp_path / "data")
    lm = [*LM, f"data.root={tmp_path / 'data'}"]
    whole = final_vector(tmp_path, "whole", lm)
    split = final_vector(tmp_path, "split", [*lm, "client.grad_accum_steps=4"])
    assert torch.allclose(whole, split, atol=1e-5)


def test_bf16_mixed_trains_on_the_cpu_close_to_full_precision(tmp_path):
    full = final_vector(tmp_path, "full", FAST)
    bf16 = final_vector(tmp_path, "bf16", [*FAST, "precision=bf16-mixed"])
    assert not torch.equal(full, bf16)
    assert torch.allclose(full, bf16, atol=0.05)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision=16-mixed"], "precision: 16-mixed needs CUDA"),
        (["precision=64"], "precision: must be 32, bf16-mixed or 16-mixed, got '64'"),
        (["client.grad_accum_steps=0"], "client.grad_accum_steps: must be an integer >= 1"),
        (
            ["engine=vectorized", "client.grad_accum_steps=2"],
            "engine: engine=vectorized trains in full precision without micro-batches",
        ),
        (
            ["client=dpsgd", "client.grad_accum_steps=2"],
            "client: client=dpsgd clips whole-batch per-sample gradients",
        ),
    ],
)
def test_bad_precision_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        build(compose_config([*FAST, *overrides]), tmp_path)
    assert str(err.value).startswith(message), str(err.value)
