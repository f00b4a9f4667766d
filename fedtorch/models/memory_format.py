"""``memory_format``: the layout of a model's 4-D (conv) weights."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from fedtorch.errors import ConfigError

log = logging.getLogger("fedtorch")


def set_memory_format(
    name: str, model: nn.Module, trainer: Any, probe: torch.Tensor, device: torch.device
) -> None:
    """Store the model's 4-D (conv) weights channels_last when ``memory_format`` asks.

    ``auto`` does so on the CPU, where oneDNN convolutions then skip a layout conversion
    each call (a NIID-Bench simple-CNN round ran 1.36x as fast in experiments/speed's
    memory_format table), unless the trainer cannot (DP-SGD) or the model's forward cannot
    (``.view`` on a conv output):
    then it keeps the default layout and says why. On CUDA ``auto`` keeps the default.
    Only float rounding differs between the layouts.
    """
    has_conv = any(p.dim() == 4 for p in model.parameters())
    if name == "contiguous" or not has_conv or (name == "auto" and device.type != "cpu"):
        return
    if not getattr(trainer, "supports_channels_last", True):
        if name == "channels_last":
            raise ConfigError(
                "memory_format",
                f"channels_last is not supported by {type(trainer).__name__} (Opacus's "
                "per-sample conv gradients need contiguous weights); use auto or contiguous",
            )
        return
    model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            model.eval()
            model(probe)
    except RuntimeError as exc:
        model.to(memory_format=torch.contiguous_format)
        reason = str(exc).strip().splitlines()[0][:160]
        if name == "channels_last":
            raise ConfigError(
                "memory_format", f"the model's forward fails with channels_last weights: {reason}"
            ) from exc
        log.info(
            "memory_format=auto: keeping contiguous weights, the model's forward "
            "fails with channels_last (%s)",
            reason,
        )
