"""Client sampling: which clients train in round r, seeded by (seed, r), or from the OS
CSPRNG under DP in secure mode (so nobody who knows the seed can tell the cohorts, which
the subsampling amplification of the privacy accounting assumes)."""

from __future__ import annotations

import torch

from fedtorch import seeding
from fedtorch.errors import ConfigError
from fedtorch.privacy.noise import CsprngStream


def cohort_size(num_clients: int, clients_per_round: int | None, fraction: float | None) -> int:
    """Clients per round from ``clients_per_round`` or ``fraction`` (all clients if neither).

    ``fraction`` follows McMahan et al.: max(round(C * K), 1).
    """
    if clients_per_round is not None and fraction is not None:
        raise ConfigError("clients_per_round", "set clients_per_round or fraction, not both")
    if clients_per_round is not None:
        if not isinstance(clients_per_round, int) or not 1 <= clients_per_round <= num_clients:
            raise ConfigError(
                "clients_per_round",
                f"must be an integer in [1, num_clients={num_clients}], got {clients_per_round!r}",
            )
        return clients_per_round
    if fraction is not None:
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError("fraction", f"must be in (0, 1], got {fraction!r}")
        return max(round(fraction * num_clients), 1)
    return num_clients


def sample_clients(num_clients: int, k: int, seed: int, round_idx: int) -> list[int]:
    """``k`` distinct client ids drawn uniformly without replacement, sorted ascending.

    Depends only on ``(seed, round_idx)``, so a round samples the same clients whatever
    happened before it (resume, other engines).
    """
    if k == num_clients:
        return list(range(num_clients))
    gen = seeding.generator(seed, seeding.CLIENT_SAMPLING, round_idx)
    return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())


def sample_poisson(num_clients: int, rate: float, seed: int, round_idx: int) -> list[int]:
    """Each client independently with probability ``rate`` (the cohort size varies).

    The sampling that DP accounting for subsampled mechanisms assumes.
    """
    gen = seeding.generator(seed, seeding.CLIENT_SAMPLING, round_idx)
    return torch.nonzero(torch.rand(num_clients, generator=gen) < rate).flatten().tolist()


def sample_cohort(
    num_clients: int,
    clients_per_round: int,
    seed: int,
    round_idx: int,
    poisson: bool,
    secure: bool = False,
) -> list[int]:
    """Round ``round_idx``'s cohort: ``clients_per_round`` clients drawn without
    replacement, or with ``poisson`` each client independently at rate
    ``clients_per_round / num_clients``; from the OS CSPRNG when ``secure``."""
    rate = clients_per_round / num_clients
    if not secure:
        if poisson:
            return sample_poisson(num_clients, rate, seed, round_idx)
        return sample_clients(num_clients, clients_per_round, seed, round_idx)
    stream = CsprngStream()
    if poisson:
        return torch.nonzero(stream.uniform(num_clients) < rate).flatten().tolist()
    pool = list(range(num_clients))
    for i in range(clients_per_round):  # a partial Fisher-Yates shuffle
        j = i + stream.below(num_clients - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:clients_per_round])
