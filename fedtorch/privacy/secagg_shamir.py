"""Shamir t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1).

SecAgg+ shares two 32-byte secrets per client (an X25519 private key and a self-mask seed)
among its neighbours. A 32-byte secret is an integer below 2^256, so it is one element of
the field GF(p) with the Mersenne prime p = 2^521 - 1: no splitting into limbs, and the
field is far larger than the secrets (the brief for these secrets asks for at least
2^128). A share is the pair (x, f(x)) of a random polynomial f of degree t - 1 with
f(0) = secret; x is the holder's evaluation point (client id + 1, never 0). Any t shares
determine f(0) by Lagrange interpolation; t - 1 shares are independent of the secret.

Coefficients come from :mod:`secrets` (the OS CSPRNG). Lagrange coefficients depend only
on the evaluation points, so they are cached: a server that reconstructs many secrets from
the same helpers (the complete graph) pays the O(t^2) interpolation setup once.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from fedtorch.privacy.secagg_errors import SecAggAbort, SecAggProtocolError

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: one field element on the wire


def split(secret: bytes, points: Iterable[int], threshold: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of the 32-byte ``secret`` at the evaluation ``points``.

    Raises:
        ValueError: a bad secret length, a point outside [1, p), or ``threshold`` not in
            [1, number of points].
    """
    xs = list(points)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and in [1, p)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """f(x) mod p by Horner's rule (``coefficients[0]`` is f(0))."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for any f of degree < len(xs)."""
    coefficients = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coefficients.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(coefficients)


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares ``{x: f(x)}``.

    The ``threshold`` smallest points are used, so the result does not depend on the
    order in which shares arrived.

    Raises:
        SecAggAbort: fewer than ``threshold`` shares.
        SecAggProtocolError: the interpolated value is not a 32-byte secret (the shares
            are inconsistent, or fewer than the sharing's real threshold were used).
    """
    if len(shares) < threshold:
        raise SecAggAbort(f"{len(shares)} shares of a secret, {threshold} needed")
    xs = tuple(sorted(shares)[:threshold])
    if any(not 0 < x < PRIME for x in xs) or any(not 0 <= shares[x] < PRIME for x in xs):
        raise SecAggProtocolError("a Shamir share lies outside the field")
    value = sum(lam * shares[x] for lam, x in zip(lagrange_at_zero(xs), xs)) % PRIME
    if value >= 1 << (8 * SECRET_BYTES):
        raise SecAggProtocolError("reconstructed secret out of range: inconsistent shares")
    return value.to_bytes(SECRET_BYTES, "big")


def encode_share(value: int) -> bytes:
    """A field element as :data:`SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """The field element of :func:`encode_share`.

    Raises:
        SecAggProtocolError: wrong length or not below p.
    """
    if len(data) != SHARE_BYTES:
        raise SecAggProtocolError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise SecAggProtocolError("a Shamir share lies outside the field")
    return value
