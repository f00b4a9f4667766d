"""``memory_format``: conv weights stored channels_last on the CPU (``auto``), the same
training up to float rounding, plain row-major global state, and a clear answer where the
layout cannot be used (DP-SGD, a forward that calls ``.view`` on a conv output)."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from tests.conftest import FAST, FAST_NO_MODEL, compose_config

CONV = [*FAST_NO_MODEL, "model._target_=tests.test_memory_format.TinyConv", "rounds=1"]


class TinyConv(torch.nn.Module):
    """Two 3x3 convolutions and a linear head, for the synthetic 1x8x8 inputs."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(input_shape[0], 4, 3)
        self.conv2 = torch.nn.Conv2d(4, 6, 3)
        self.head = torch.nn.Linear(6 * 4 * 4, num_classes)

    def features(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class ViewConv(TinyConv):
    """``.view`` needs a contiguous conv output, which channels_last weights do not give."""

    def forward(self, x):
        out = self.features(x)
        return self.head(out.view(out.size(0), -1))


def conv_layout(orch) -> bool:
    return orch.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_uses_channels_last_on_cpu_and_keeps_the_global_state_row_major(tmp_path):
    orch = build(compose_config(CONV), tmp_path)
    assert conv_layout(orch) and not orch.model.conv2.weight.is_contiguous()
    assert all(v.is_contiguous() for v in orch.global_state.values())
    orch.run()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(v.is_contiguous() for v in saved.values())
    mlp = build(compose_config(FAST), tmp_path / "mlp")  # nothing 4-D: nothing changes
    assert all(p.is_contiguous() for p in mlp.model.parameters())


def test_layouts_train_the_same_up_to_rounding(tmp_path):
    vectors = {}
    for layout in ("channels_last", "contiguous"):
        cfg = compose_config([*CONV, "rounds=2", f"memory_format={layout}"])
        orch = build(cfg, tmp_path / layout)
        assert conv_layout(orch) == (layout == "channels_last")
        orch.run()
        vectors[layout] = orch.global_vector
    torch.testing.assert_close(vectors["channels_last"], vectors["contiguous"], atol=1e-5, rtol=0)


def test_a_forward_that_needs_contiguous_activations(tmp_path, caplog):
    view = [*CONV, "model._target_=tests.test_memory_format.ViewConv"]
    with caplog.at_level(logging.INFO, logger="fedtorch"):
        orch = build(compose_config(view), tmp_path / "auto")
    assert not conv_layout(orch) and orch.model.conv2.weight.is_contiguous()
    assert any("keeping contiguous weights" in m for m in caplog.messages)
    orch.run()
    with pytest.raises(ConfigError, match="^memory_format: the model's forward fails"):
        build(compose_config([*view, "memory_format=channels_last"]), tmp_path / "cl")


def test_dpsgd_keeps_contiguous_weights(tmp_path):
    dp = [*CONV, "client=dpsgd"]
    assert not conv_layout(build(compose_config(dp), tmp_path / "auto"))
    with pytest.raises(ConfigError, match="^memory_format: channels_last is not supported by"):
        build(compose_config([*dp, "memory_format=channels_last"]), tmp_path / "cl")


def test_vectorized_engine_beside_a_channels_last_model(tmp_path):
    """The vectorized engine stacks the (row-major) global state, not the model's own
    weights, so it trains the same whatever layout the model was given."""
    vectors = []
    for engine in ("sequential", "vectorized"):
        orch = build(compose_config([*CONV, "rounds=2", f"engine={engine}"]), tmp_path / engine)
        assert conv_layout(orch)
        orch.run()
        vectors.append(orch.global_vector)
    torch.testing.assert_close(vectors[0], vectors[1], atol=1e-5, rtol=0)
