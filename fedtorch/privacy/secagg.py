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


# Masks are expanded block by block, each block from its own derived seed, so that a
# client can mask (and the server add and unmask) one block at a time: neither side ever
# holds a full-size int64 mask or masked vector, whatever the model size.
PRG_BLOCK = 1 << 22


def prg_block(seed: int, round_idx: int, block: int, size: int, bits: int) -> torch.Tensor:
    """Block ``block`` of the mask expanded from ``seed``: [size] int64 in [0, 2^bits)."""
    key = f"{seed}:{round_idx}:{block}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randint(0, 2**bits, (size,), generator=gen, dtype=torch.int64)


def blocks(size: int) -> list[tuple[int, slice]]:
    """``(block index, slice)`` of a [size] vector, in PRG_BLOCK pieces."""
    return [
        (b, slice(start, min(start + PRG_BLOCK, size)))
        for b, start in enumerate(range(0, size, PRG_BLOCK))
    ]


def prg(seed: int, round_idx: int, size: int, bits: int) -> torch.Tensor:
    """A [size] int64 mask, uniform in [0, 2^bits), expanded from a shared seed."""
    return torch.cat(
        [prg_block(seed, round_idx, b, part.stop - part.start, bits) for b, part in blocks(size)]
    )


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

    def start_round(self, cohort: list[int], round_idx: int, size: int) -> MaskingRound:
        """Key agreement and secret sharing for ``cohort``; then clients mask one by one
        their [``size``] updates."""
        return MaskingRound(self, list(cohort), round_idx, size)

    def mask(
        self, updates: torch.Tensor, client_ids: list[int], round_idx: int
    ) -> tuple[list[MaskedClient], dict[int, dict[str, dict[int, int]]], int]:
        """Run the clients' side for the cohort ``client_ids`` (row i = client i).

        Returns (masked messages, shares each client holds of each other's secrets as
        ``{holder: {"sk": {owner: share}, "b": {owner: share}}}``, clipped coordinates).
        """
        round_ = self.start_round(client_ids, round_idx, updates.shape[1])
        messages = [round_.mask(c, row) for c, row in zip(client_ids, updates)]
        return messages, round_.held, round_.clipped

    def delivers(self, client_id: int, round_idx: int) -> bool:
        """Whether the client delivers its masked input (it drops with ``dropout``)."""
        if not self.dropout:
            return True
        gen = seeding.generator(self.seed, seeding.SECAGG, round_idx, client_id, 1)
        return float(torch.rand(1, generator=gen)) >= self.dropout

    def survivors(self, client_ids: list[int], round_idx: int) -> list[int]:
        """Clients that deliver their masked input (each drops with ``dropout``)."""
        return [c for c in client_ids if self.delivers(c, round_idx)]

    # Server side ---------------------------------------------------------------------

    def ring_sum(self, messages: list[MaskedClient], size: int) -> torch.Tensor:
        """The sum mod 2^bits of the masked inputs [P] (int64)."""
        total = torch.zeros(size, dtype=torch.int64)
        for m in messages:
            total.add_(m.masked).bitwise_and_(self.modulus - 1)
        return total

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
        by_id = {m.client_id: m for m in messages}
        size = messages[0].masked.numel()
        total = self.ring_sum([by_id[c] for c in delivered], size)
        public = {m.client_id: m.public_key for m in messages}
        return self.unmask_total(total, cohort, delivered, public, shares_from, round_idx)

    def unmask_total(
        self,
        total: torch.Tensor,
        cohort: list[int],
        delivered: list[int],
        public_keys: dict[int, int],
        shares_from: dict[int, dict[str, dict[int, int]]],
        round_idx: int,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Remove the masks from the ring sum ``total`` of the delivered inputs; the sum of
        their inputs [P] (computed in float64, returned as ``dtype``).

        ``total`` is overwritten. The masks are removed block by block (see PRG_BLOCK).

        Raises:
            SecAggError: fewer survivors than the threshold.
        """
        t = self.threshold_for(len(cohort))
        if len(delivered) < t:
            raise SecAggError(
                f"round {round_idx}: secure aggregation cannot unmask: {len(delivered)} of "
                f"{len(cohort)} clients delivered, threshold {t}"
            )
        helpers = delivered[:t]
        self_seeds = [
            reconstruct({h: shares_from[h]["b"][c] for h in helpers}, t) for c in delivered
        ]
        delivered_set = set(delivered)
        pair_seeds = []  # (seed, sign to add) of the masks the dropped left in the sum
        for d in (c for c in cohort if c not in delivered_set):
            secret_key = reconstruct({h: shares_from[h]["sk"][d] for h in helpers}, t)
            for c in delivered:
                # c added +mask if d > c, -mask if d < c: undo it
                pair_seeds.append((pow(public_keys[c], secret_key, PRIME), -1 if d > c else 1))
        for b, part in blocks(total.numel()):
            view, n = total[part], part.stop - part.start
            # Reduce after every mask (with 62 bits two unreduced masks overflow int64); the
            # ring's modulus is a power of two, so x mod 2^bits is x & (2^bits - 1), also
            # for negative x in two's complement.
            for self_seed in self_seeds:
                view.sub_(prg_block(self_seed, round_idx, b, n, self.bits)).bitwise_and_(
                    self.modulus - 1
                )
            for pair, sign in pair_seeds:
                mask = prg_block(pair, round_idx, b, n, self.bits)
                view.add_(mask, alpha=sign).bitwise_and_(self.modulus - 1)
        # Back from the ring to signed fixed point, then to floats, a block at a time.
        out = torch.empty(total.numel(), dtype=dtype)
        scale = self.scale_for(len(cohort))
        for _, part in blocks(total.numel()):
            view = total[part]
            signed = torch.where(view >= self.modulus // 2, view - self.modulus, view)
            out[part] = signed.double().div_(scale)
        return out


class MaskingRound:
    """One round of the protocol for a fixed cohort, run one client at a time.

    Key agreement and secret sharing happen for the whole cohort up front (only integers);
    then each client's update, as the client finishes training, is masked and added to
    a running ring sum (:meth:`submit`), so the server holds one [P] vector whatever the
    cohort size. A cohort member that never delivers (its training failed, or it dropped
    out after masking) is handled by the protocol's recovery: its pair masks are removed
    from the survivors' sum.
    """

    def __init__(
        self, agg: SecureAggregation, cohort: list[int], round_idx: int, size: int
    ) -> None:
        self.agg, self.cohort, self.round_idx, self.size = agg, cohort, round_idx, size
        self.scale = agg.scale_for(len(cohort))
        t = agg.threshold_for(len(cohort))
        self.keys = {c: agg._keys(c, round_idx) for c in cohort}
        self.public = {c: pow(GENERATOR, self.keys[c][0], PRIME) for c in cohort}
        self.held: dict[int, dict[str, dict[int, int]]] = {c: {"sk": {}, "b": {}} for c in cohort}
        for owner in cohort:
            secret_key, self_seed, rng = self.keys[owner]
            for name, secret in (("sk", secret_key), ("b", self_seed)):
                for holder, value in share(secret, cohort, t, rng).items():
                    self.held[holder][name][owner] = value
        self.clipped = 0
        self.masked = 0
        self.total: torch.Tensor | None = None
        self.delivered: list[int] = []

    def mask(self, client_id: int, update: torch.Tensor) -> MaskedClient:
        """Client ``client_id``'s whole masked message (what the server would receive)."""
        self._count(update)
        parts = [self._masked_block(client_id, update, b, part) for b, part in blocks(len(update))]
        return MaskedClient(client_id, self.public[client_id], torch.cat(parts))

    def submit(self, client_id: int, update: torch.Tensor) -> None:
        """Mask the client's update and add it to the ring sum block by block (unless the
        client drops out after masking): the client masks a block and the server adds it at
        once, so no full-size masked vector ever exists."""
        self._count(update)
        if not self.agg.delivers(client_id, self.round_idx):
            return
        for b, part in blocks(len(update)):
            self._add(self._masked_block(client_id, update, b, part), part)
        self.delivered.append(client_id)

    def _count(self, update: torch.Tensor) -> None:
        self.masked += 1
        r = self.agg.value_range
        self.clipped += sum(int((update[part].abs() > r).sum()) for _, part in blocks(len(update)))

    def _masked_block(
        self, client_id: int, update: torch.Tensor, block: int, part: slice
    ) -> torch.Tensor:
        """Block ``block`` of the client's input: clipped to [-R, R], in fixed point, plus
        its self mask and its pair masks (+ for higher ids, - for lower), mod 2^bits."""
        agg, r, n = self.agg, self.agg.value_range, part.stop - part.start
        y = torch.round(update[part].clamp(-r, r).double().cpu() * self.scale).to(torch.int64)
        secret_key, self_seed, _ = self.keys[client_id]
        y.add_(prg_block(self_seed, self.round_idx, block, n, agg.bits)).bitwise_and_(
            agg.modulus - 1
        )
        for other in self.cohort:
            if other == client_id:
                continue
            pair = pow(self.public[other], secret_key, PRIME)
            mask = prg_block(pair, self.round_idx, block, n, agg.bits)
            y.add_(mask, alpha=1 if other > client_id else -1).bitwise_and_(agg.modulus - 1)
        return y

    def _add(self, masked: torch.Tensor, part: slice) -> None:
        if self.total is None:
            self.total = torch.zeros(self.size, dtype=torch.int64)
        view = self.total[part]
        view.add_(masked).bitwise_and_(self.agg.modulus - 1)

    def unmask(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The sum of the delivered inputs [P] as ``dtype``; see
        :meth:`SecureAggregation.unmask_total`. Consumes the ring sum."""
        total = self.total if self.total is not None else torch.zeros(self.size, dtype=torch.int64)
        self.total = None
        shares = {h: self.held[h] for h in self.delivered}
        return self.agg.unmask_total(
            total, self.cohort, self.delivered, self.public, shares, self.round_idx, dtype
        )
