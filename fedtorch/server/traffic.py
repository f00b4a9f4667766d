"""Bytes sent each way in a round, counted from what was encoded, not from a formula.

Down, each sampled client receives the keys that change (``mean`` and ``max`` rules), a
strategy's extra vectors (SCAFFOLD's server control variate) and the base weights that
exact LoRA aggregation folds each round; frozen (``keep``) weights once per client. Up,
each reporting client sends its update and extra vectors: the encoded message with
compression, ``bits``-wide ring elements under secure aggregation, float32 otherwise.

``communication_budget_mb`` (FlowerTune's rule: 200,000 MB) ends a run after the round in
which the bytes sent both ways reach it; a MB here is 2^20 bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

import torch

from fedtorch.compression import Compression
from fedtorch.compression.bits import packed_bytes
from fedtorch.errors import ConfigError
from fedtorch.server.progress import Progress
from fedtorch.state.layout import StateLayout


class Traffic:
    """Per-round byte counts of one run (see the module docstring)."""

    def __init__(
        self,
        layout: StateLayout,
        global_state: Mapping[str, torch.Tensor],
        extra_vectors: tuple[int, int],
        folded_keys: Collection[str],
        compression: Compression,
        secure_bits: int | None,
        budget_mb: float | None = None,
    ) -> None:
        self.layout, self.compression, self.secure_bits = layout, compression, secure_bits
        if budget_mb is not None and (
            isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or budget_mb <= 0
        ):
            raise ConfigError(
                "communication_budget_mb", f"must be null or a number > 0, got {budget_mb!r}"
            )
        self.budget_mb = budget_mb
        vector_bytes = layout.size * 4
        extra_down, extra_up = extra_vectors
        folded = sum(global_state[k].numel() * global_state[k].element_size() for k in folded_keys)
        changing = layout.bytes_of(global_state, ("mean", "max"))
        self.down_per_client = changing + extra_down * vector_bytes + folded
        # Frozen (keep) weights never change, so each client downloads them once.
        self.down_once = layout.bytes_of(global_state, ("keep",)) - folded
        self.up_per_client = changing + extra_up * vector_bytes
        # The parts of a message that compression leaves alone: counters (max keys) and a
        # strategy's extra vectors up; all but the mean keys down.
        mean_bytes = layout.bytes_of(global_state, ("mean",))
        self.up_other = self.up_per_client - mean_bytes
        self.down_other = self.down_per_client - mean_bytes
        self.round_down_per_client = self.down_per_client

    def broadcast(
        self, global_state: dict[str, torch.Tensor], global_vector: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The global weights as clients receive them: the server's own, or with
        ``compression.downlink`` a copy decoded from the compressed vector (clients train
        from it and take their deltas against it; sets this round's download bytes)."""
        if self.compression.downlink == "none":
            return global_state, global_vector
        decoded, nbytes = self.compression.broadcast(global_vector)
        self.round_down_per_client = nbytes + self.down_other
        state = dict(global_state)
        for spec in self.layout.specs:  # only the vector's keys change; the rest is shared
            state[spec.name] = state[spec.name].clone()
        self.layout.unflatten_into(decoded, state)
        return state, decoded

    def uplink(self, reporting: list[int]) -> int:
        """The bytes the reporting clients sent this round."""
        if self.compression.enabled:
            return self.compression.uplink_bytes(reporting) + self.up_other * len(reporting)
        if self.secure_bits is not None:
            ring = packed_bytes(self.layout.size, self.secure_bits)
            return (ring + self.up_other) * len(reporting)
        return self.up_per_client * len(reporting)

    def count_round(
        self, progress: Progress, sampled: list[int], reporting: list[int], row: dict[str, Any]
    ) -> Progress:
        """``progress`` with this round's bytes added; compression ratios go into ``row``."""
        base_sent = progress.base_sent
        if self.down_once:
            base_sent = sorted(set(base_sent) | set(sampled))
        once = self.down_once * (len(base_sent) - len(progress.base_sent))
        up_raw = self.up_per_client * len(reporting)
        up = self.uplink(reporting)
        down_raw = self.down_per_client * len(sampled)
        down = self.round_down_per_client * len(sampled)
        compressed_down = self.compression.downlink != "none"
        if self.compression.enabled or compressed_down:
            row["compression_ratio"] = up_raw / up if up else None
        if compressed_down:
            row["compression_ratio_down"] = down_raw / down if down else None
        return replace(
            progress,
            bytes_down=progress.bytes_down + down + once,
            bytes_up=progress.bytes_up + up,
            bytes_down_uncompressed=progress.bytes_down_uncompressed + down_raw + once,
            bytes_up_uncompressed=progress.bytes_up_uncompressed + up_raw,
            base_sent=base_sent,
        )

    def budget_reached(self, progress: Progress) -> str | None:
        """The line saying the run stops, once the bytes sent up and down so far reach
        ``communication_budget_mb``; None before (or without a budget)."""
        if self.budget_mb is None:
            return None
        sent_mb = (progress.bytes_up + progress.bytes_down) / 2**20
        if sent_mb < self.budget_mb:
            return None
        return (
            f"communication budget: {sent_mb:,.1f} MB sent up and down after round "
            f"{progress.round} reaches communication_budget_mb={self.budget_mb:g}; stopping"
        )
