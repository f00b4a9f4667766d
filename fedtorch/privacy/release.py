"""What the server releases from a round's updates when privacy or secure aggregation is on.

:class:`PrivateRound` is one round of it, fed one client at a time by the update pipeline:
each update arrives clipped (and in local mode noised) by the client's side with DP;
without DP its step pre-weights the update so that the sum is already the average;
secure aggregation then masks it.
As an aggregator it sums the updates (in the clear, or as a ring sum of masked vectors),
and when the round finishes it unmasks the sum, adds the central noise, divides by the
expected cohort size, and hands the released mean to the strategy's server step. Its
memory is one [P] sum whatever the cohort size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from fedtorch.privacy.dp import DifferentialPrivacy, NoPrivacy
from fedtorch.privacy.secagg import SecureAggregation
from fedtorch.results import ClientResult

log = logging.getLogger("fedtorch")


class PrivateRound:
    """One round's private release.

    Args:
        privacy: the DP settings (or :class:`NoPrivacy`).
        secure_agg: the secure-aggregation settings (possibly disabled).
        weights: each cohort client's weight in the average without DP (sample count, or
            1 for a uniform average); ignored with DP, whose mean is sum / (q N).
        round_idx: the round.
        like: a [P] tensor of the flat layout (size, dtype, device of the released mean).
        server_step: ``mean [P] -> new global vector`` (the strategy's server step).
    """

    def __init__(
        self,
        privacy: DifferentialPrivacy | NoPrivacy,
        secure_agg: SecureAggregation,
        weights: dict[int, float],
        round_idx: int,
        like: torch.Tensor,
        server_step: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.privacy, self.round_idx, self.like = privacy, round_idx, like
        self.server_step = server_step
        self.weights, self.cohort_weight = weights, sum(weights.values())
        self.masking = (
            secure_agg.start_round(list(weights), round_idx, like.numel())
            if secure_agg.enabled
            else None
        )
        self.value_range = secure_agg.value_range
        self.total: torch.Tensor | None = None
        self.reported_weight = 0.0
        self.reported = 0
        self.unclipped = 0
        self.metrics: dict[str, Any] = {}

    def client_step(self, client: ClientResult, update: torch.Tensor) -> torch.Tensor:
        """The step before masking: without DP pre-weight the update, in place; count it.
        DP's clipping and local noise ran on the client's side
        (:class:`~fedtorch.server.round_pipeline.RoundClientSide`), which also recorded
        the adaptive-clipping bit in :attr:`unclipped`."""
        if not self.privacy.enabled:
            update.mul_(self.weights[client.client_id] / self.cohort_weight)
        self.reported_weight += self.weights[client.client_id]
        self.reported += 1
        return update

    def add(self, client: ClientResult, sent: torch.Tensor) -> None:
        """The server receives one client's update (under masks with secure aggregation:
        masked and added block by block, see :meth:`MaskingRound.submit`)."""
        if self.masking is not None:
            self.masking.submit(client.client_id, sent)
            return
        if self.total is None:
            self.total = torch.zeros_like(sent)
        self.total.add_(sent)

    def finish(self) -> torch.Tensor:
        """Unmask, release the mean, and take the server step on it."""
        total = self._sum()
        if self.privacy.enabled:
            mean, released = self.privacy.release(
                total, float(self.unclipped), self.round_idx, self.reported
            )
            self.metrics.update(released)
        elif self.reported_weight:
            # Pre-weighted by the whole cohort's weight; clients that failed are not in the
            # sum, so rescale to the average of those that reported.
            mean = total.mul_(self.cohort_weight / self.reported_weight)
        else:
            mean = total
        return self.server_step(mean)

    def _sum(self) -> torch.Tensor:
        if self.masking is None or not self.masking.masked:
            return self.total if self.total is not None else torch.zeros_like(self.like)
        total = self.masking.unmask(self.like.dtype)
        clipped = self.masking.clipped
        if clipped:
            log.warning(
                "round %d: secure aggregation clipped %d coordinates to +-%g "
                "(raise secure_aggregation.value_range)",
                self.round_idx,
                clipped,
                self.value_range,
            )
        self.metrics.update(
            secagg_dropped=self.masking.masked - len(self.masking.delivered),
            secagg_clipped=clipped,
        )
        return total.to(self.like.device, self.like.dtype)
