"""Privacy accounting of what is released, for the sampling that produced it.

Every round that releases a noisy aggregate is one application of a subsampled Gaussian
mechanism with noise multiplier z; the accountant composes them and reports epsilon for a
given delta. The analysis must match how the cohort was drawn:

* ``poisson`` (each client independently with probability q = m / N): Opacus's RDP (or
  PRV) accountant for the Poisson-subsampled Gaussian, under add/remove-one adjacency.
* ``fixed`` (exactly m of N clients, without replacement): the RDP bound for sampling
  without replacement (Wang, Balle & Kasiviswanathan 2019) from Google's ``dp-accounting``,
  which holds under replace-one adjacency: replacing one client's data moves a sum of
  updates clipped to C by up to 2C, so the Gaussian of noise z C counts as multiplier z / 2.
  Its epsilon is therefore not comparable with a Poisson run's, and larger.
* every client every round (q = 1, local DP): plain Gaussian composition.

One sampling scheme is never accounted as another.
"""

from __future__ import annotations

import functools
import logging

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedtorch.errors import ConfigError, require

ACCOUNTANTS = ("rdp", "prv")
SAMPLINGS = ("poisson", "fixed")


class PrivacyAccountant:
    """Composes the rounds' (noise multiplier, sampling rate) and reports epsilon.

    Args:
        mechanism: ``rdp`` or ``prv`` (Opacus's); ``fixed`` sampling needs ``rdp``.
        sampling: ``poisson``, or ``fixed`` with ``population`` N and ``cohort`` m.
    """

    def __init__(
        self,
        mechanism: str = "rdp",
        sampling: str = "poisson",
        population: int | None = None,
        cohort: int | None = None,
    ) -> None:
        if mechanism not in ACCOUNTANTS:
            raise ConfigError(
                "privacy.accountant", f"must be one of {ACCOUNTANTS}, got {mechanism!r}"
            )
        if sampling == "fixed" and mechanism != "rdp":
            raise ConfigError(
                "privacy.accountant",
                "fixed-size cohorts are accounted with the RDP bound for sampling without "
                "replacement; use accountant=rdp, or privacy.sampling=poisson",
            )
        if sampling == "fixed":
            require("dp_accounting", "privacy.sampling", "accounting fixed-size cohorts", "dp")
        self.mechanism, self.sampling = mechanism, sampling
        self.population, self.cohort = population, cohort
        self._accountant = create_accountant(mechanism)

    @property
    def history(self) -> list[tuple]:
        """``(noise_multiplier, sample_rate, steps)`` entries, as Opacus keeps them."""
        return self._accountant.history

    def describe(self) -> str:
        """What is accounted, for the summary."""
        if self.sampling == "fixed":
            return "rdp, fixed cohorts without replacement (replace-one adjacency)"
        return f"{self.mechanism}, Poisson sampling (add/remove-one adjacency)"

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        return self._epsilon(self.history, delta)

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, delta: float, rounds: int = 1
    ) -> float:
        """Epsilon if ``rounds`` more rounds with these parameters were run (nothing
        recorded)."""
        return self._epsilon([*self.history, (noise_multiplier, sample_rate, rounds)], delta)

    def _epsilon(self, history: list[tuple], delta: float) -> float:
        if not history:
            return 0.0
        if self.sampling == "fixed" and any(rate < 1 for _, rate, _ in history):
            return _without_replacement_epsilon(history, self.population, self.cohort, delta)
        probe = create_accountant(self.mechanism)
        probe.history = list(history)
        return float(probe.get_epsilon(delta=delta))

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self._accountant.history = [tuple(h) for h in state["history"]]


def _without_replacement_epsilon(
    history: list[tuple], population: int, cohort: int, delta: float
) -> float:
    """RDP epsilon of fixed-size cohorts drawn without replacement (replace-one)."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    orders, total = None, 0.0
    for z, rate, steps in history:
        orders, one_step = _one_step_rdp(float(z), rate >= 1, population, cohort)
        total = total + one_step * int(steps)
    return float(rdp.compute_epsilon(orders, total, delta)[0])


@functools.lru_cache(maxsize=64)
def _one_step_rdp(z: float, everyone: bool, population: int, cohort: int) -> tuple:
    """(orders, RDP at each order) of one round: the Gaussian of multiplier z / 2 (one
    replaced client moves the clipped sum by 2C), on a cohort of ``cohort`` drawn without
    replacement from ``population`` (or on everyone). Cached: computing it takes a while."""
    dpa = require("dp_accounting", "privacy.sampling", "accounting fixed-size cohorts", "dp")
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # its series warnings are expected
    accountant = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    event = dpa.GaussianDpEvent(z / 2)
    if not everyone:
        event = dpa.SampledWithoutReplacementDpEvent(population, cohort, event)
    accountant.compose(event, 1)
    return accountant._orders, accountant._rdp.copy()


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    mechanism: str = "rdp",
    accountant: PrivacyAccountant | None = None,
) -> float:
    """The smallest noise multiplier z with epsilon <= target after ``rounds`` rounds (for
    ``accountant``'s sampling and history, if given)."""
    if accountant is None or (accountant.sampling == "poisson" and not accountant.history):
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=mechanism,
            )
        )
    low, high = 0.01, 1.0
    while accountant.epsilon_after(high, sample_rate, delta, rounds) > target_epsilon:
        high *= 2
        if high > 1e6:
            raise ConfigError(
                "privacy.target_epsilon", f"{target_epsilon:g} cannot be met in {rounds} rounds"
            )
    while high - low > 1e-4 * high:
        middle = (low + high) / 2
        if accountant.epsilon_after(middle, sample_rate, delta, rounds) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
