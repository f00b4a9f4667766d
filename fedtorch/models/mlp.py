"""Multi-layer perceptron; with the defaults it is McMahan et al. (2017)'s "2NN"."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers, then a linear classifier.

    With ``input_shape=(1, 28, 28)``, ``hidden=(200, 200)`` and 10 classes this is the 2NN of
    "Communication-Efficient Learning of Deep Networks from Decentralized Data": 199,210
    parameters.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden: Sequence[int] = (200, 200),
    ) -> None:
        super().__init__()
        widths = [prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
