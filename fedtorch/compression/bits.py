"""Bit packing: small unsigned integer codes stored ``width`` bits each in a uint8 tensor.

Compressors send codes narrower than a byte (signs: 1 bit; QSGD with s levels: the bits of
2s + 1 values), so the bytes a client sends are the bytes of the packed tensor.
"""

from __future__ import annotations

import torch


def packed_bytes(count: int, width: int) -> int:
    """Bytes :func:`pack_bits` produces for ``count`` codes of ``width`` bits."""
    return -(-count * width // 8)


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack integer ``codes`` (each in [0, 2^width)) into ``ceil(n * width / 8)`` bytes,
    least significant bit first."""
    if not 1 <= width <= 32:
        raise ValueError(f"width must be in [1, 32], got {width}")
    codes = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(width, device=codes.device)
    bits = ((codes.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=codes.device)
    return (bits.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The ``count`` codes (int64) that :func:`pack_bits` packed at ``width`` bits."""
    shifts8 = torch.arange(8, device=packed.device)
    bits = ((packed.to(torch.int64).unsqueeze(1) >> shifts8) & 1).reshape(-1)
    bits = bits[: count * width].reshape(count, width)
    shifts = torch.arange(width, device=packed.device)
    return (bits << shifts).sum(1)
