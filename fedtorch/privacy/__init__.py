"""Privacy: differential privacy of the global model (clipping, noise, accounting) and
secure aggregation of client updates.

May import the leaves, :mod:`fedtorch.strategies` and :mod:`fedtorch.pipeline`.
"""

from fedtorch.privacy.accounting import PrivacyAccountant, calibrate_noise
from fedtorch.privacy.dp import DifferentialPrivacy, NoPrivacy, clip_rows

__all__ = [
    "DifferentialPrivacy",
    "NoPrivacy",
    "PrivacyAccountant",
    "calibrate_noise",
    "clip_rows",
]
