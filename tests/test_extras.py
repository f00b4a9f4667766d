"""Options that need an optional extra say which one when it is missing."""

from __future__ import annotations

import sys

import pytest

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from tests.conftest import FAST_NO_MODEL, compose_config


@pytest.mark.parametrize(
    "module, overrides, message",
    [
        (
            "peft",
            ["model=mlp", "adapter=lora"],
            'adapter: adapter=lora needs peft: pip install "fedtorch[llm]"',
        ),
        (
            "transformers",
            ["model=hf"],
            'model: model=hf needs transformers: pip install "fedtorch[llm]"',
        ),
    ],
)
def test_missing_extra_is_named_in_one_line(tmp_path, monkeypatch, module, overrides, message):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    cfg = compose_config([*FAST_NO_MODEL, *overrides])
    with pytest.raises(ConfigError) as err:
        build(cfg, tmp_path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
