"""``init_from``: start a model from a saved ``state_dict`` (a run's ``model.pt``, say)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedtorch.errors import ConfigError


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Start from a saved ``state_dict`` (``init_from``: a run's ``model.pt``, say)."""
    if not path.is_file():
        raise ConfigError("init_from", f"{path} is not a file (give a model.pt of a run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError("init_from", f"{path}: not a readable state_dict ({exc})") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        parts = [
            f"{label} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if keys
        ]
        raise ConfigError("init_from", f"{path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)
