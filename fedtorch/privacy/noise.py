"""Randomness that protects a person: DP noise and DP client sampling.

Two sources, chosen by ``privacy.secure_mode``:

* seeded (``secure_mode=false``): PyTorch generators seeded by (seed, purpose, round,
  client), so a simulation repeats bit for bit. Anyone who knows the seed and the model can
  subtract the noise: right for research on one machine, wrong for a model that leaves it.
* secure (``secure_mode=true``): the operating system's CSPRNG. A fresh 256-bit key from
  ``os.urandom`` drives an AES-256-CTR keystream (pyca ``cryptography``), whose bytes become
  uniform doubles; Gaussians come from them by the Box-Muller transform in float64. Against
  the floating-point attacks on Gaussian samplers (Mironov 2012; Holohan & Braghin 2021,
  "Secure Random Sampling in Differential Privacy") each Gaussian of standard deviation s is
  the sum of 2n = 4 independent ones of deviation s/2 (n = 2, as Opacus's secure mode
  does). Nothing is reproducible; what was drawn is part of the model, so resuming from a
  checkpoint stays exact.

Noise is generated in blocks of at most :data:`BLOCK` values, so the extra memory is
bounded whatever the model size.
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedtorch import seeding

BLOCK = 1 << 20  # values per block of secure noise
SECURE_SUMMANDS = 4  # 2n Gaussians summed per value, n = 2 (Holohan & Braghin 2021)


class CsprngStream:
    """Uniform randomness from an AES-256-CTR keystream keyed by ``os.urandom``."""

    def __init__(self) -> None:
        key, nonce = os.urandom(32), os.urandom(16)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()

    def bytes(self, count: int) -> bytes:
        return self._encryptor.update(bytes(count))

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 values uniform on (0, 1): 53 random bits each, never 0."""
        words = torch.frombuffer(bytearray(self.bytes(8 * count)), dtype=torch.int64)
        mantissa = (words >> 11) & ((1 << 53) - 1)  # the top 53 bits, as a non-negative int
        return (mantissa.to(torch.float64) + 0.5) * 2.0**-53

    def below(self, bound: int) -> int:
        """An integer uniform in [0, bound) (rejection sampling, no modulo bias)."""
        bits = max(1, (bound - 1).bit_length())
        while True:
            value = int.from_bytes(self.bytes(8), "little") & ((1 << bits) - 1)
            if value < bound:
                return value

    def standard_normal(self, count: int) -> torch.Tensor:
        """``count`` float64 N(0, 1) values by the Box-Muller transform."""
        pairs = (count + 1) // 2
        u1, u2 = self.uniform(pairs), self.uniform(pairs)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]


def secure_gaussian(count: int, std: float) -> torch.Tensor:
    """``count`` float64 values of N(0, std^2) from the OS CSPRNG, each the sum of
    :data:`SECURE_SUMMANDS` Gaussians of deviation std / sqrt(SECURE_SUMMANDS)."""
    stream = CsprngStream()
    out = torch.empty(count, dtype=torch.float64)
    part = std / math.sqrt(SECURE_SUMMANDS)
    for start in range(0, count, BLOCK):
        size = min(BLOCK, count - start)
        block = stream.standard_normal(size)
        for _ in range(SECURE_SUMMANDS - 1):
            block += stream.standard_normal(size)
        out[start : start + size] = block.mul_(part)
    return out


def add_gaussian(
    target: torch.Tensor, std: float, secure: bool, seed: int, *key: int
) -> torch.Tensor:
    """``target += N(0, std^2 I)`` in place: from the OS CSPRNG when ``secure``, else from
    the generator seeded by ``(seed, PRIVACY, *key)``. Returns ``target``."""
    flat = target.view(-1)
    if secure:
        for start in range(0, flat.numel(), BLOCK):
            size = min(BLOCK, flat.numel() - start)
            noise = secure_gaussian(size, std)
            flat[start : start + size] += noise.to(flat.device, flat.dtype)
        return target
    gen = seeding.generator(seed, seeding.PRIVACY, *key)
    noise = torch.randn(flat.shape[0], generator=gen, dtype=flat.dtype)
    flat.add_(noise.to(flat.device), alpha=std)
    return target


def gaussian_scalar(std: float, secure: bool, seed: int, *key: int) -> float:
    """One draw of N(0, std^2) (see :func:`add_gaussian`)."""
    if secure:
        return float(secure_gaussian(1, std)[0])
    gen = seeding.generator(seed, seeding.PRIVACY, *key)
    return float(torch.randn(1, generator=gen)) * std
