"""Seed derivation: every random choice comes from ``seed`` and a path of integers.

A run never draws from global RNG state in an order-dependent way; instead each consumer
(client sampling in round r, batch order of client c in round r, ...) derives its own seed
from ``(seed, purpose, r, c)``. Results are therefore independent of execution order,
engine and parallelism.
"""

from __future__ import annotations

import hashlib

import torch

# Purposes: distinct streams so that, e.g., client sampling and batch shuffling never
# share random numbers.
MODEL_INIT = 1
PARTITION = 2
CLIENT_SAMPLING = 3
CLIENT_TRAINING = 4
DATASET = 5
SYSTEM = 6
ATTACK = 7
PRIVACY = 8
SECAGG = 9
COMPRESSION = 10
AUGMENTATION = 11


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed determined only by ``seed`` and ``path`` (stable across runs and hosts)."""
    text = ",".join(str(int(v)) for v in (seed, *path)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *path: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *path))
    return gen


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed PyTorch's global generators for ``device`` (randomness inside models: dropout).

    Unlike ``torch.manual_seed``, this does not queue a lazy seeding call for every
    accelerator backend on each use (which costs a stack trace per call and grows a queue
    when CUDA is not initialised): only the CPU generator and, on CUDA, that device's.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
