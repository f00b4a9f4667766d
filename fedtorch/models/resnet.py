"""ResNet-18 for 32x32 colour images (He et al. 2016, CIFAR variant: 3x3 stem, no max-pool).

``norm="group"`` swaps BatchNorm for GroupNorm, the usual choice in FL (Hsieh et al. 2020)
because BatchNorm statistics differ across non-IID clients and clash with DP-SGD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedtorch.errors import ConfigError


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ConfigError("model.norm", f"must be 'batch' or 'group', got {kind!r}")


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, cout, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18: stem 3x3 conv 64, four stages of two basic blocks (64, 128, 256, 512
    channels), global average pooling and a linear classifier (11.2M parameters).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        norm: str = "batch",
        groups: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False),
            _norm(norm, 64, groups),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [
                _BasicBlock(cin, cout, stride, norm, groups),
                _BasicBlock(cout, cout, 1, norm, groups),
            ]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
