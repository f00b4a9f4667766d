"""What the server releases from a round's updates when privacy or secure aggregation is on.

One function, :func:`private_mean`: clip (and in local mode noise) each update, sum them in
the clear or under secure aggregation, then add the central noise and divide by the
expected cohort size. The strategy then takes its server step on that single mean.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedtorch.privacy.dp import DifferentialPrivacy, NoPrivacy
from fedtorch.privacy.secagg import SecureAggregation
from fedtorch.results import RoundResults

log = logging.getLogger("fedtorch")


def private_mean(
    results: RoundResults,
    privacy: DifferentialPrivacy | NoPrivacy,
    secure_agg: SecureAggregation,
    weighted: bool,
    round_idx: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The released mean update [P] and the round's privacy metrics.

    Without DP the rows are pre-weighted (by sample count if ``weighted``, else uniformly)
    so that the (secure) sum is already the average; with DP the mean is sum / (q N) (see
    :mod:`fedtorch.privacy.dp`). The rows of ``results.deltas`` are modified in place.
    """
    ids = [c.client_id for c in results.clients]
    rows, metrics, unclipped = results.deltas, {}, 0.0
    if privacy.enabled:
        reports = privacy.client_side(rows, ids, round_idx)
        unclipped = float(reports.unclipped.sum())
    elif len(ids):
        counts = results.sample_counts() if weighted else torch.ones(len(ids), device=rows.device)
        rows.mul_((counts / counts.sum()).to(rows.dtype)[:, None])
    if secure_agg.enabled and ids:
        messages, held, clipped = secure_agg.mask(rows, ids, round_idx)
        delivered = secure_agg.survivors(ids, round_idx)
        total = secure_agg.unmask_sum(
            messages, ids, delivered, {h: held[h] for h in delivered}, round_idx
        ).to(rows.device, rows.dtype)
        if clipped:
            log.warning(
                "round %d: secure aggregation clipped %d coordinates to +-%g "
                "(raise secure_aggregation.value_range)",
                round_idx,
                clipped,
                secure_agg.value_range,
            )
        metrics.update(secagg_dropped=len(ids) - len(delivered), secagg_clipped=clipped)
    else:
        total = rows.sum(dim=0)
    if not privacy.enabled:
        return total, metrics
    mean, released = privacy.release(total, unclipped, round_idx)
    metrics.update(released)
    return mean, metrics
