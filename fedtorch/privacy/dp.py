"""User-level differential privacy for federated averaging (DP-FedAvg).

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models". Each
sampled client's update is clipped to L2 norm C; the server releases

    mean = (sum_k clip(Delta_k) + N(0, (z C)^2 I)) / (q N)          (central DP)

where q N is the expected cohort size (a fixed denominator, so one client changes the sum by
at most C whatever the cohort), and any FedAvg-family server step (FedAvg, FedAvgM,
FedAdam, ...) is applied to that mean: post-processing costs no privacy. With
``mode=local`` every client adds N(0, (z C)^2 I) to its own clipped update before sending
it, so the server never sees an un-noised update.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): clients also report b_k = 1[||Delta_k|| <= C]; the server releases
b = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2 and sets
C <- C exp(-eta_C (b - gamma)), steering C to the gamma-quantile of update norms. Centring
the bits makes one client move the released count by at most 1/2, so with the update noise
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) both releases together are one Gaussian mechanism
of noise multiplier z (the vector (Delta / (z_Delta C), (b - 1/2) / sigma_b) has norm at
most 1/z), and z is what the accountant composes.

What this guarantees: (epsilon, delta) user-level DP of the sequence of global models for
the sampling the run actually uses, accounted as :mod:`fedtorch.privacy.accounting`
says (Poisson: add/remove one client's whole dataset; fixed cohorts: replace one). The
noise comes from PyTorch's seeded generator unless ``secure_mode`` is on
(:mod:`fedtorch.privacy.noise`): seeded noise repeats exactly, which is right for
simulation and wrong for a model that leaves the machine. Local training statistics,
sample counts and integer counters in the logs are not privatized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedtorch.errors import ConfigError
from fedtorch.privacy.accounting import PrivacyAccountant, calibrate_noise
from fedtorch.privacy.noise import add_gaussian, gaussian_scalar

MODES = ("central", "local")
SAMPLING = ("poisson", "fixed")
ON_BUDGET = ("calibrate", "stop")


def clip_rows(updates: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row of ``updates`` [K, P] in place to L2 norm <= ``clip_norm``.

    Returns the rows' norms before clipping [K].
    """
    norms = updates.norm(dim=1)
    scale = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    updates.mul_(scale[:, None])
    return norms


@dataclass
class ClientReports:
    """What the clipped, possibly noised client side hands to the aggregation."""

    rows: torch.Tensor  # [K, P] clipped (and in local mode noised) updates
    unclipped: torch.Tensor  # [K] bool: ||Delta_k|| <= C (adaptive clipping's bits)


class NoPrivacy:
    """``privacy=none``: updates are aggregated by the strategy as they are."""

    enabled = False
    sampling = "fixed"

    def __init__(self, secure_mode: bool | None = None, seed: int = 0) -> None:
        _check_secure_mode(secure_mode)
        self.secure_mode, self.seed = secure_mode, seed
        self.secure = bool(secure_mode)

    def bind(
        self, num_clients: int, clients_per_round: int, rounds: int, secure: bool = False
    ) -> None:
        self.secure = secure

    def round_allowed(self) -> bool:
        return True

    def summary(self, stopped_by_budget: bool) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DifferentialPrivacy:
    """DP-FedAvg with Gaussian noise, optional adaptive clipping and a privacy budget.

    Args:
        mode: ``central`` (the server adds noise to the sum) or ``local`` (each client to
            its own update; accounted as if the client took part in every round).
        clip_norm: C, the L2 bound of one client's update (the initial one if adaptive).
        noise_multiplier: z; null to calibrate it from ``target_epsilon``.
        delta: the delta of the reported (epsilon, delta).
        target_epsilon: privacy budget; null for none.
        on_budget: ``calibrate`` (choose z before training so the whole run spends exactly
            the budget) or ``stop`` (train with the given z and stop before the round that
            would overspend).
        sampling: ``poisson`` (each client independently with probability q = m / N) or
            ``fixed`` (exactly m clients a round); each accounted as what it is.
        accountant: ``rdp`` or ``prv`` (Opacus; ``fixed`` needs ``rdp``).
        secure_mode: noise and DP client sampling from the OS CSPRNG
            (:mod:`fedtorch.privacy.noise`); null: on where parties differ (``data.silos``),
            off in one process.
        adaptive_clipping: adapt C towards the ``target_quantile`` of update norms.
        target_quantile: gamma.
        clip_learning_rate: eta_C.
        clipped_count_stddev: sigma_b; null uses the paper's expected cohort size / 20.
        seed: the run seed (noise streams derive from it).
    """

    enabled = True

    def __init__(
        self,
        mode: str = "central",
        clip_norm: float = 1.0,
        noise_multiplier: float | None = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        on_budget: str = "stop",
        sampling: str = "poisson",
        accountant: str = "rdp",
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        secure_mode: bool | None = None,
        seed: int = 0,
    ) -> None:
        for key, value, allowed in (
            ("mode", mode, MODES),
            ("sampling", sampling, SAMPLING),
            ("on_budget", on_budget, ON_BUDGET),
        ):
            if value not in allowed:
                raise ConfigError(f"privacy.{key}", f"must be one of {allowed}, got {value!r}")
        _positive("clip_norm", clip_norm)
        if not (isinstance(delta, float) and 0 < delta < 1):
            raise ConfigError("privacy.delta", f"must be in (0, 1), got {delta!r}")
        if target_epsilon is not None:
            _positive("target_epsilon", target_epsilon)
        if noise_multiplier is None:
            if target_epsilon is None or on_budget != "calibrate":
                raise ConfigError(
                    "privacy.noise_multiplier",
                    "is null: set it, or set privacy.target_epsilon with on_budget=calibrate",
                )
        else:
            _positive("noise_multiplier", noise_multiplier)
            if target_epsilon is not None and on_budget == "calibrate":
                raise ConfigError(
                    "privacy.noise_multiplier",
                    "on_budget=calibrate chooses it from target_epsilon; set it to null",
                )
        if adaptive_clipping and mode == "local":
            raise ConfigError("privacy.adaptive_clipping", "is available with mode=central only")
        if not 0 < target_quantile < 1:
            raise ConfigError(
                "privacy.target_quantile", f"must be in (0, 1), got {target_quantile!r}"
            )
        self.mode, self.clip_norm, self.noise_multiplier = mode, float(clip_norm), noise_multiplier
        self.delta, self.target_epsilon, self.on_budget = delta, target_epsilon, on_budget
        self.sampling, self.adaptive = sampling, adaptive_clipping
        self.target_quantile, self.clip_lr = target_quantile, clip_learning_rate
        self.clipped_count_stddev = clipped_count_stddev
        _check_secure_mode(secure_mode)
        self.seed, self.secure_mode, self.secure = seed, secure_mode, bool(secure_mode)
        self.mechanism = accountant
        self.accountant = PrivacyAccountant(accountant)
        self.update_noise_multiplier = noise_multiplier
        self.calibrated = noise_multiplier is None

    def bind(
        self, num_clients: int, clients_per_round: int, rounds: int, secure: bool = False
    ) -> None:
        """Fix the sampling rate, the accountant and the noise; refuse budgets no round can
        meet. ``secure``: ``secure_mode`` as resolved for the run."""
        self.secure, self.rounds = secure, rounds
        self.expected_clients = float(clients_per_round)
        self.sample_rate = clients_per_round / num_clients
        self.account_rate = self.sample_rate if self.mode == "central" else 1.0
        sampling = self.sampling if self.mode == "central" else "poisson"  # local: q = 1
        self.accountant = PrivacyAccountant(
            self.mechanism, sampling, num_clients, clients_per_round
        )
        if self.calibrated:
            self.noise_multiplier = calibrate_noise(
                self.target_epsilon,
                self.delta,
                self.account_rate,
                rounds,
                self.mechanism,
                self.accountant,
            )
        self._split_noise()

    def _split_noise(self) -> None:
        """The update noise multiplier (z, or z_Delta with adaptive clipping)."""
        z = self.noise_multiplier
        self.update_noise_multiplier = z
        if self.adaptive:
            if self.clipped_count_stddev is None:
                self.clipped_count_stddev = self.expected_clients / 20
            two_sigma = 2 * self.clipped_count_stddev
            if two_sigma <= z:
                raise ConfigError(
                    "privacy.clipped_count_stddev",
                    f"adaptive clipping needs 2 * sigma_b > z; got sigma_b={two_sigma / 2:g}, "
                    f"z={z:g}",
                )
            self.update_noise_multiplier = (z**-2 - two_sigma**-2) ** -0.5
        if self.target_epsilon is not None and self.on_budget == "stop":
            first = self.accountant.epsilon_after(z, self.account_rate, self.delta)
            if first > self.target_epsilon:
                raise ConfigError(
                    "privacy.target_epsilon",
                    f"one round with noise_multiplier={z:g} already spends epsilon={first:.3g}",
                )

    def round_allowed(self) -> bool:
        """False if the next round would take epsilon past ``target_epsilon``."""
        if self.target_epsilon is None or self.on_budget != "stop":
            return True
        after = self.accountant.epsilon_after(self.noise_multiplier, self.account_rate, self.delta)
        return after <= self.target_epsilon * (1 + 1e-9)

    def privatize(self, update: torch.Tensor, client_id: int, round_idx: int) -> bool:
        """One client's side, in place on its update [P]: clip to C; in local mode add its
        noise. Returns whether the update was within C (adaptive clipping's bit)."""
        norm = clip_rows(update[None, :], self.clip_norm)[0]
        if self.mode == "local":
            std = self.noise_multiplier * self.clip_norm
            add_gaussian(update, std, self.secure, self.seed, round_idx, client_id + 1)
        return bool(norm <= self.clip_norm)

    def client_side(
        self, updates: torch.Tensor, client_ids: list[int], round_idx: int
    ) -> ClientReports:
        """:meth:`privatize` every row of ``updates`` [K, P] (row i = ``client_ids[i]``)."""
        unclipped = [
            self.privatize(row, client, round_idx) for row, client in zip(updates, client_ids)
        ]
        return ClientReports(updates, torch.tensor(unclipped, dtype=torch.bool))

    def release(
        self,
        total: torch.Tensor,
        unclipped_count: float,
        round_idx: int,
        reported: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The private mean from the sum of the clients' reports; accounts for the round.

        ``unclipped_count`` is sum_k b_k over the ``reported`` clients (default: the
        expected cohort). ``total`` is overwritten (the mean is computed in its storage).
        Returns ``(mean [P], metrics)``.
        """
        if reported is None:
            reported = round(self.expected_clients)
        clip_used = self.clip_norm
        if self.mode == "central":
            std = self.update_noise_multiplier * self.clip_norm
            total = add_gaussian(total, std, self.secure, self.seed, round_idx, 0)
        mean = total.div_(self.expected_clients)
        if self.adaptive:
            # sum_k (b_k - 1/2): sensitivity 1/2, as the noise split assumes.
            centred = unclipped_count - reported / 2
            std = self.clipped_count_stddev
            noisy = centred + gaussian_scalar(std, self.secure, self.seed, round_idx, -1)
            fraction = noisy / self.expected_clients + 0.5
            self.clip_norm *= math.exp(-self.clip_lr * (fraction - self.target_quantile))
        self.accountant.step(self.noise_multiplier, self.account_rate)
        return mean, {
            "epsilon": self.accountant.epsilon(self.delta),
            "clip_norm": clip_used,
        }

    def summary(self, stopped_by_budget: bool) -> dict[str, Any]:
        """What ``summary.json`` records of the run's privacy."""
        return {
            "epsilon": self.accountant.epsilon(self.delta),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "privacy_mode": self.mode,
            "client_sampling": self.sampling,
            "accounting": self.accountant.describe() if self.mode == "central" else "gaussian",
            "secure_mode": self.secure,
            "stopped_by_privacy_budget": stopped_by_budget,
        }

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's accounting. A calibrated run keeps the noise it was
        calibrated with; resumed to more rounds than that budget allows, it stops here
        with one line, before training."""
        self.accountant.load_state_dict(state["accountant"])
        self.clip_norm = float(state["clip_norm"])
        if not self.calibrated or state.get("noise_multiplier") is None:
            return
        self.noise_multiplier = float(state["noise_multiplier"])
        self._split_noise()
        done = sum(int(steps) for _, _, steps in self.accountant.history)
        left = max(self.rounds - done, 0)
        z, q = self.noise_multiplier, self.account_rate
        after = self.accountant.epsilon_after(z, q, self.delta, left) if left else 0.0
        if after > self.target_epsilon * (1 + 1e-9):
            raise ConfigError(
                "rounds",
                f"resuming a run calibrated to privacy.target_epsilon={self.target_epsilon:g} "
                f"to {self.rounds} rounds would spend epsilon={after:.3g} at the "
                f"noise_multiplier={z:.4g} it was calibrated with; keep rounds at most the "
                "original or start a new run",
            )


def _positive(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"privacy.{key}", f"must be > 0, got {value!r}")


def _check_secure_mode(value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError("privacy.secure_mode", f"must be true, false or null, got {value!r}")
