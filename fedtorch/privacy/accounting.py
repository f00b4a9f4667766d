"""Privacy accounting through Opacus's accountants (RDP by default, or PRV).

Every round that releases a noisy aggregate is one application of the subsampled Gaussian
mechanism with noise multiplier z and sampling rate q; the accountant composes them and
reports epsilon for a given delta. The analysis is Poisson subsampling (each client
independently with probability q): with ``privacy.sampling=poisson`` the run samples
exactly that way; with ``fixed`` (exactly m = qN clients a round) the same numbers are the
customary approximation, and the README says so.
"""

from __future__ import annotations

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedtorch.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")


class PrivacyAccountant:
    """Composes the rounds' (noise multiplier, sampling rate) and reports epsilon."""

    def __init__(self, mechanism: str = "rdp") -> None:
        if mechanism not in ACCOUNTANTS:
            raise ConfigError(
                "privacy.accountant", f"must be one of {ACCOUNTANTS}, got {mechanism!r}"
            )
        self.mechanism = mechanism
        self._accountant = create_accountant(mechanism)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=delta))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float) -> float:
        """Epsilon if one more round with these parameters were run (nothing recorded)."""
        probe = create_accountant(self.mechanism)
        probe.history = [*self._accountant.history]
        probe.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return float(probe.get_epsilon(delta=delta))

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self._accountant.history]}

    def load_state_dict(self, state: dict) -> None:
        self._accountant.history = [tuple(h) for h in state["history"]]


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, mechanism: str = "rdp"
) -> float:
    """The smallest noise multiplier z with epsilon <= target after ``rounds`` rounds."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds,
            accountant=mechanism,
        )
    )
