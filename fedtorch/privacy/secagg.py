"""Secure aggregation by pairwise additive masking (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning"), simulated in one process.

Protocol, for the clients U1 that were sampled and masked their input:

1. Key agreement: client i has a secret key sk_i and publishes pk_i = g^sk_i mod p; each
   pair shares s_ij = pk_j^sk_i = pk_i^sk_j (Diffie-Hellman). Client i also draws a
   self-mask seed b_i. It Shamir-shares sk_i and b_i among U1 with threshold t.
2. Quantization: the update is clipped to [-R, R] per coordinate (counted and reported,
   never silent) and mapped to fixed point in the ring Z_(2^bits), with a scale that
   keeps the sum of |U1| values from wrapping.
3. Masking: y_i = x_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)  (mod 2^bits).
   A single y_i is uniformly distributed: it says nothing about x_i.
4. Unmasking: the server adds the y_i of the clients U2 that delivered. Pair masks
   between members of U2 cancel. For each survivor it reconstructs b_i from t shares and
   removes PRG(b_i); for each client that dropped out after masking it reconstructs sk_d
   and removes the masks PRG(s_dj) it left in the survivors' inputs. Fewer than t
   survivors: the round fails with an error, since nothing can be unmasked.

The server side (:meth:`SecureAggregation.unmask_sum`) only ever receives masked vectors,
public keys and shares; it learns the sum of the survivors' inputs and nothing else.

Threat model and limits of this simulation: honest-but-curious server, clients that may
drop out at any time (up to |U1| - t of them after masking). The key agreement uses the
Mersenne prime 2^127 - 1, far too small for real security, and all secrets come from
seeded generators so runs repeat; this module shows the arithmetic and its guarantees
(cancellation, recovery, the threshold), it is not a cryptographic implementation. The
server never asks for both b_i and sk_i of one client, as the protocol requires.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch

from fedtorch import seeding
from fedtorch.errors import ConfigError, FedtorchError

PRIME = 2**127 - 1  # field of the key agreement and of Shamir's shares
GENERATOR = 3


class SecAggError(FedtorchError):
    """Unmasking is impossible (too few survivors)."""


# Shamir secret sharing over GF(PRIME).


def share(secret: int, holders: list[int], threshold: int, rng: random.Random) -> dict[int, int]:
    """Shares of ``secret`` for each holder id (evaluation points holder + 1)."""
    coefficients = [secret] + [rng.randrange(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[h] = y
    return shares


def reconstruct(shares: dict[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = [(h + 1, y) for h, y in list(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return secret


def prg(seed: int, round_idx: int, size: int, bits: int) -> torch.Tensor:
    """A [size] int64 mask, uniform in [0, 2^bits), expanded from a shared seed."""
    digest = hashlib.blake2b(f"{seed}:{round_idx}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randint(0, 2**bits, (size,), generator=gen, dtype=torch.int64)


@dataclass
class MaskedClient:
    """What one client sends during the protocol (all the server ever sees of it)."""

    client_id: int
    public_key: int
    masked: torch.Tensor  # [P] int64 in [0, 2^bits)


class SecureAggregation:
    """Pairwise-masked secure sum of the round's updates.

    Args:
        enabled: use it (false: the server sums plain updates).
        threshold: survivors needed to unmask, as a fraction of the masked cohort (t =
            ceil(threshold * K), at least 2).
        bits: ring size 2^bits (8 to 62).
        value_range: R, the largest |coordinate| a client may send; larger values are
            clipped to +-R and counted. Null takes the DP clip norm (a clipped update
            cannot exceed it); without DP it must be set.
        dropout: probability that a client drops out after masking (simulates the case
            the protocol's recovery handles).
        seed: the run seed.
    """

    def __init__(
        self,
        enabled: bool = False,
        threshold: float = 0.5,
        bits: int = 32,
        value_range: float | None = None,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(
                "secure_aggregation.threshold", f"must be in (0, 1], got {threshold!r}"
            )
        if not isinstance(bits, int) or not 8 <= bits <= 62:
            raise ConfigError(
                "secure_aggregation.bits", f"must be an integer in [8, 62], got {bits!r}"
            )
        if value_range is not None and not value_range > 0:
            raise ConfigError("secure_aggregation.value_range", f"must be > 0, got {value_range!r}")
        if not 0 <= dropout < 1:
            raise ConfigError("secure_aggregation.dropout", f"must be in [0, 1), got {dropout!r}")
        self.enabled, self.threshold, self.bits = enabled, threshold, bits
        self.value_range, self.dropout, self.seed = value_range, dropout, seed
        self.modulus = 2**bits

    def bind(self, dp_clip_norm: float | None, dp_local: bool) -> None:
        """Pick R: the DP clip norm bounds every coordinate of a clipped update."""
        if not self.enabled or self.value_range is not None:
            return
        if dp_clip_norm is None:
            raise ConfigError(
                "secure_aggregation.value_range",
                "is null: set it (the largest |update coordinate|), or enable privacy=dp_*",
            )
        self.value_range = dp_clip_norm * (8.0 if dp_local else 1.0)

    def threshold_for(self, cohort_size: int) -> int:
        return max(2, math.ceil(self.threshold * cohort_size))

    def scale_for(self, cohort_size: int) -> float:
        """Fixed-point scale: the sum of ``cohort_size`` values in [-R, R] cannot wrap."""
        return (2 ** (self.bits - 1) - 1) / (cohort_size * self.value_range)

    # Client side ---------------------------------------------------------------------

    def _keys(self, client_id: int, round_idx: int) -> tuple[int, int, random.Random]:
        rng = random.Random(seeding.derive_seed(self.seed, seeding.SECAGG, round_idx, client_id))
        secret_key = rng.randrange(2, PRIME - 1)
        self_seed = rng.getrandbits(126)
        return secret_key, self_seed, rng

    def mask(
        self, updates: torch.Tensor, client_ids: list[int], round_idx: int
    ) -> tuple[list[MaskedClient], dict[int, dict[str, dict[int, int]]], int]:
        """Run the clients' side for the cohort ``client_ids`` (row i = client i).

        Returns (masked messages, shares each client holds of each other's secrets as
        ``{holder: {"sk": {owner: share}, "b": {owner: share}}}``, clipped coordinates).
        """
        k, size = len(client_ids), updates.shape[1]
        scale = self.scale_for(k)
        t = self.threshold_for(k)
        keys = {c: self._keys(c, round_idx) for c in client_ids}
        public = {c: pow(GENERATOR, keys[c][0], PRIME) for c in client_ids}
        held: dict[int, dict[str, dict[int, int]]] = {c: {"sk": {}, "b": {}} for c in client_ids}
        for owner in client_ids:
            secret_key, self_seed, rng = keys[owner]
            for name, secret in (("sk", secret_key), ("b", self_seed)):
                for holder, value in share(secret, client_ids, t, rng).items():
                    held[holder][name][owner] = value
        r = self.value_range
        clipped = int((updates.abs() > r).sum())
        fixed = torch.round(updates.clamp(-r, r).double().cpu() * scale).to(torch.int64)
        messages = []
        for row, me in enumerate(client_ids):
            y = (fixed[row] + prg(keys[me][1], round_idx, size, self.bits)) % self.modulus
            for other in client_ids:
                if other == me:
                    continue
                pair = pow(public[other], keys[me][0], PRIME)
                mask = prg(pair, round_idx, size, self.bits)
                y = (y + mask) % self.modulus if other > me else (y - mask) % self.modulus
            messages.append(MaskedClient(me, public[me], y))
        return messages, held, clipped

    def survivors(self, client_ids: list[int], round_idx: int) -> list[int]:
        """Clients that deliver their masked input (each drops with ``dropout``)."""
        if not self.dropout:
            return list(client_ids)
        kept = []
        for c in client_ids:
            gen = seeding.generator(self.seed, seeding.SECAGG, round_idx, c, 1)
            if float(torch.rand(1, generator=gen)) >= self.dropout:
                kept.append(c)
        return kept

    # Server side ---------------------------------------------------------------------

    def unmask_sum(
        self,
        messages: list[MaskedClient],
        cohort: list[int],
        delivered: list[int],
        shares_from: dict[int, dict[str, dict[int, int]]],
        round_idx: int,
    ) -> torch.Tensor:
        """The sum of the delivered clients' inputs [P] (float64), from masked vectors only.

        ``shares_from[h]`` are the shares survivor h hands over: of b_i for survivors and
        of sk_d for the dropped.

        Raises:
            SecAggError: fewer survivors than the threshold.
        """
        t = self.threshold_for(len(cohort))
        if len(delivered) < t:
            raise SecAggError(
                f"round {round_idx}: secure aggregation cannot unmask: {len(delivered)} of "
                f"{len(cohort)} clients delivered, threshold {t}"
            )
        by_id = {m.client_id: m for m in messages}
        size = messages[0].masked.numel()
        total = torch.zeros(size, dtype=torch.int64)
        for c in delivered:
            total = (total + by_id[c].masked) % self.modulus
        helpers = delivered[:t]
        for c in delivered:  # remove self masks
            self_seed = reconstruct({h: shares_from[h]["b"][c] for h in helpers}, t)
            total = (total - prg(self_seed, round_idx, size, self.bits)) % self.modulus
        for d in (c for c in cohort if c not in delivered):  # masks the dropped left behind
            secret_key = reconstruct({h: shares_from[h]["sk"][d] for h in helpers}, t)
            for c in delivered:
                pair = pow(by_id[c].public_key, secret_key, PRIME)
                mask = prg(pair, round_idx, size, self.bits)
                # c added +mask if d > c, -mask if d < c: undo it
                total = (total - mask) % self.modulus if d > c else (total + mask) % self.modulus
        signed = torch.where(total >= self.modulus // 2, total - self.modulus, total)
        return signed.double() / self.scale_for(len(cohort))
