"""Errors of the SecAgg+ protocol (:mod:`fedtorch.privacy.secagg_plus`).

Each is a :class:`~fedtorch.errors.FedtorchError` with a one-line message, so the command
line prints it without a traceback:

- :class:`SecAggAbort`: the round cannot finish without revealing something it must not
  (too few survivors overall, or fewer than t shares for a reconstruction); nothing is
  unmasked or aggregated.
- :class:`SecAggProtocolError`: a message is malformed, out of order, from an unexpected
  sender, or fails authentication (an AES-GCM tag that does not verify).
- :class:`SecAggInputError`: a caller passed a vector or setting the protocol cannot use.
"""

from __future__ import annotations

from fedtorch.errors import FedtorchError


class SecAggPlusError(FedtorchError):
    """Base class of the SecAgg+ errors."""


class SecAggAbort(SecAggPlusError):
    """The round is aborted; the server discarded its running sum and reveals nothing."""


class SecAggProtocolError(SecAggPlusError):
    """A received message cannot be used (bad shape, version, sender, stage or tag)."""


class SecAggInputError(SecAggPlusError):
    """An input vector or parameter is outside what the protocol accepts."""
