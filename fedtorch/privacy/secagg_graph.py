"""The SecAgg+ neighbour graph and the rule that picks its degree k.

Graph (Bell et al. 2020, as in Flower's SecAgg+): the Harary graph H(n, k) for even k is
the circulant graph in which the client at position p of a ring of n positions is joined to
the k/2 positions on either side. The clients are placed on the ring by a uniformly random
permutation drawn from the OS CSPRNG, so each client's neighbourhood is a uniformly random
k-subset of the other n - 1 clients. ``k = n - 1`` is the complete graph of Bonawitz et
al. 2017. Each client masks with, and Shamir-shares its secrets among, its k neighbours
only, so its cost grows with k instead of n.

The degree rule (:func:`choose_degree`). Bell et al. show that SecAgg+ on a random graph
is secure and correct unless one of three bad events happens, for a set C of corrupted
clients (colluding with an honest-but-curious server, |C| <= gamma n) and a set D of
clients that drop out during the round (|D| <= delta n), both fixed before the graph is
drawn; they bound the probability of these events over the graph and ask for a total below
2^-sigma with sigma = 40. This module evaluates the same three events for the graph it
builds (rather than the Erdos-Renyi estimates of the paper), with c = ceil(gamma n),
d = ceil(delta n), m = min(n, c + d), and a union bound over the n clients:

1. Disconnection: the honest clients that delivered must stay connected once C and D are
   removed, or the server learns the partial sum of a component. What is left of H(n, k)
   is connected whenever no k/2 consecutive ring positions are all removed (consecutive
   remaining clients are then at most k/2 positions apart, hence adjacent). The removed
   positions are a uniform m-subset, so a given window is all removed with probability
   (m)_(k/2) / (n)_(k/2) (falling factorials); over the n windows:
   P1 <= n (m)_(k/2) / (n)_(k/2). The complete graph never disconnects: P1 = 0.
2. Too many corrupted neighbours: if t of client i's neighbours are corrupted they can
   rebuild i's secrets. A neighbourhood holds X ~ Hypergeometric(n - 1, c, k) corrupted
   clients: P2 <= n P[X >= t].
3. Too few surviving neighbours: a reconstruction needs t shares, so it fails when more
   than k - t neighbours drop out; Y ~ Hypergeometric(n - 1, d, k): P3 <= n P[Y > k - t].

:func:`failure_bound` returns P1 + P2 + P3 (the hypergeometric tails summed exactly in log
space). :func:`choose_degree` takes the smallest even k in [2, n - 2] (with
t = :func:`threshold_for`) whose bound is at most 2^-40, else the complete graph if its
bound is (for the complete graph P2 and P3 are 0 or n: the rule then just checks
c < t <= n - 1 - d), else refuses the parameters. Both are conservative: worst-case counts
(ceil(rate n) clients, at least one for any rate above 0, are corrupted and drop, counted
among each client's n - 1 others) and union bounds. Assumption inherited from the paper: C
and D do not depend on the graph (an adversary that picks its drop-outs after seeing the
graph is not covered).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from fedtorch.errors import ConfigError
from fedtorch.privacy.secagg_errors import SecAggInputError

TARGET_FAILURE = 2.0**-40  # Bell et al.'s statistical security parameter sigma = 40
MIN_CLIENTS = 3  # with two clients the sum reveals the other's input


@dataclass(frozen=True)
class DegreeChoice:
    """A graph degree, its Shamir threshold, and the failure bound they meet."""

    degree: int
    threshold: int
    bound: float


def is_complete(num_clients: int, degree: int) -> bool:
    """Whether ``degree`` on ``num_clients`` clients is the complete graph."""
    return degree == num_clients - 1


def threshold_for(degree: int, fraction: float) -> int:
    """Shamir threshold t for a neighbourhood of ``degree`` clients: ceil(fraction k), at
    least 2 (one share alone would be the secret) and at most k."""
    return min(degree, max(2, math.ceil(fraction * degree - 1e-9)))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X ~ Hypergeometric(population, marked, draws)."""
    low = max(at_least, 0, draws - (population - marked))
    high = min(marked, draws)
    if low > high:
        return 0.0
    total = _log_comb(population, draws)
    return math.fsum(
        math.exp(_log_comb(marked, x) + _log_comb(population - marked, draws - x) - total)
        for x in range(low, high + 1)
    )


def _disconnection_bound(num_clients: int, degree: int, removed: int) -> float:
    """P1: some window of degree/2 consecutive ring positions is entirely removed."""
    if is_complete(num_clients, degree):
        return 0.0
    half = degree // 2
    if removed < half:
        return 0.0
    log_p = sum(math.log(removed - j) - math.log(num_clients - j) for j in range(half))
    return num_clients * math.exp(log_p)


def failure_bound(
    num_clients: int, degree: int, threshold: int, dropout_rate: float, corruption_rate: float
) -> float:
    """Upper bound on the probability that the round is insecure or cannot finish (the
    three events of the module docstring), capped at 1."""
    n, k, t = num_clients, degree, threshold
    corrupted = math.ceil(corruption_rate * n - 1e-9)
    dropped = math.ceil(dropout_rate * n - 1e-9)
    removed = min(n, corrupted + dropped)
    p1 = _disconnection_bound(n, k, removed)
    p2 = n * hypergeometric_tail(n - 1, corrupted, k, t)
    p3 = n * hypergeometric_tail(n - 1, dropped, k, k - t + 1)
    return min(1.0, p1 + p2 + p3)


def _check_rates(dropout_rate: float, corruption_rate: float, fraction: float) -> None:
    if not 0 <= dropout_rate < 1:
        raise ConfigError(
            "secure_aggregation.dropout_rate", f"must be in [0, 1), got {dropout_rate!r}"
        )
    if not 0 <= corruption_rate < 1:
        raise ConfigError(
            "secure_aggregation.corruption_rate", f"must be in [0, 1), got {corruption_rate!r}"
        )
    if not 0 < fraction <= 1:
        raise ConfigError("secure_aggregation.threshold", f"must be in (0, 1], got {fraction!r}")


def choose_degree(
    num_clients: int,
    dropout_rate: float,
    corruption_rate: float,
    threshold: float = 0.5,
    target: float = TARGET_FAILURE,
) -> DegreeChoice:
    """The smallest graph degree (and its threshold) whose :func:`failure_bound` is at most
    ``target``; the complete graph when no sparse one is.

    Args:
        num_clients: n, the clients in the graph (at least 3).
        dropout_rate: delta, the largest fraction of clients that may drop out in a round.
        corruption_rate: gamma, the largest fraction that may collude with the server.
        threshold: t as a fraction of the degree (see :func:`threshold_for`).
        target: the largest acceptable failure probability.

    Raises:
        ConfigError: a rate outside its range, or no graph (not even the complete one)
            meets ``target`` with these rates.
    """
    _check_rates(dropout_rate, corruption_rate, threshold)
    if num_clients < MIN_CLIENTS:
        raise SecAggInputError(
            f"secure aggregation needs >= {MIN_CLIENTS} clients, got {num_clients}"
        )
    for degree in range(2, num_clients - 1, 2):
        t = threshold_for(degree, threshold)
        bound = failure_bound(num_clients, degree, t, dropout_rate, corruption_rate)
        if bound <= target:
            return DegreeChoice(degree, t, bound)
    degree = num_clients - 1
    t = threshold_for(degree, threshold)
    bound = failure_bound(num_clients, degree, t, dropout_rate, corruption_rate)
    if bound > target:
        raise ConfigError(
            "secure_aggregation.dropout_rate",
            f"{dropout_rate} with corruption_rate {corruption_rate} and threshold {threshold} "
            f"cannot be met by any graph on {num_clients} clients (failure bound {bound:.3g} "
            f"> {target:.3g}); lower the rates or change the threshold",
        )
    return DegreeChoice(degree, t, bound)


def harary_graph(clients: Iterable[int], degree: int) -> dict[int, tuple[int, ...]]:
    """Each client's sorted neighbours in H(n, ``degree``) under a uniformly random
    placement of ``clients`` on the ring (OS CSPRNG); ``degree = n - 1``: complete graph.

    Raises:
        SecAggInputError: fewer than 3 clients, repeated ids, or a degree that is neither
            even in [2, n - 2] nor n - 1.
    """
    ids = sorted(clients)
    n = len(ids)
    if len(set(ids)) != n or n < MIN_CLIENTS:
        raise SecAggInputError(f"graph needs >= {MIN_CLIENTS} distinct clients, got {ids}")
    if is_complete(n, degree):
        return {c: tuple(o for o in ids if o != c) for c in ids}
    if degree % 2 or not 2 <= degree <= n - 2:
        raise SecAggInputError(
            f"graph degree must be even in [2, {n - 2}] or {n - 1} (complete), got {degree}"
        )
    ring = list(ids)
    secrets.SystemRandom().shuffle(ring)
    half = degree // 2
    return {
        ring[p]: tuple(sorted(ring[(p + o) % n] for o in range(-half, half + 1) if o))
        for p in range(n)
    }
