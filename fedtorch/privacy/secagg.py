"""Secure aggregation in the round loop: the ``secure_aggregation`` config group, running
SecAgg+ (:mod:`fedtorch.privacy.secagg_plus`) for each round's cohort.

A round, as the update pipeline drives it (every message through its byte format):

1. When the cohort is drawn (:meth:`SecureAggregation.start_round`): each member advertises
   its X25519 keys, the server draws the neighbour graph and hands out directories, each
   member Shamir-shares its self-mask seed and mask key with its neighbours (encrypted to
   each), and the server forwards the sealed shares.
2. As each client finishes training (:meth:`MaskingRound.submit`): its update (already
   clipped and noised, or pre-weighted) is clipped to [-R, R] per coordinate (counted),
   encoded in fixed point in Z_(2^bits), masked with its self mask and its neighbours' pair
   masks, and added to the server's running ring sum. A member that never delivers (its
   training failed, or a simulated drop-out) is a drop-out of that stage.
3. When the round finishes (:meth:`MaskingRound.unmask`): survivors send the shares the
   server asks for, the server removes the self masks of survivors and the pair masks of
   drop-outs, and decodes the sum. Fewer than the threshold at any stage aborts the round
   with one line (:class:`~fedtorch.privacy.secagg_errors.SecAggAbort`); nothing is
   revealed or aggregated.

Keys, seeds, shares and the graph come from the OS CSPRNG, never from ``seed``; only the
simulated drop-outs (a simulation knob) are seeded. Threat model: an honest-but-curious
server and up to t - 1 colluding clients per neighbourhood; see the README.
"""

from __future__ import annotations

import torch

from fedtorch import seeding
from fedtorch.errors import ConfigError
from fedtorch.privacy.secagg_plus import (
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    SecAggClient,
    SecAggPlusConfig,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode_fixed_point,
    encode_fixed_point,
)

# The protocol's stages, as ``secure_aggregation.dropout_stage`` names them.
STAGES = ("advertise", "share", "input", "unmask")
GRAPHS = ("sparse", "complete")


class SecureAggregation:
    """Secure sum of the round's updates by SecAgg+.

    Args:
        enabled: use it (false: the server sums plain updates).
        threshold: Shamir threshold t as a fraction of a client's neighbourhood k
            (t = ceil(threshold k), at least 2); also the fewest clients every stage needs.
        bits: ring size 2^bits (8 to 64).
        value_range: R, the largest |coordinate| a client may send; larger values are
            clipped to +-R and counted. Null takes the DP clip norm (a clipped update
            cannot exceed it); without DP it must be set.
        graph: ``sparse`` (Bell et al.'s k-regular graph, k about O(log K)) or ``complete``
            (Bonawitz et al.: every pair of clients masks).
        dropout_rate: the largest fraction of clients expected to drop out; sizes the graph.
        corruption_rate: the largest fraction of clients that may collude with the server;
            sizes the graph.
        dropout: probability that a client drops out at ``dropout_stage`` (simulation).
        dropout_stage: ``advertise``, ``share``, ``input`` or ``unmask``.
        seed: the run seed (only the simulated drop-outs derive from it).
    """

    def __init__(
        self,
        enabled: bool = False,
        threshold: float = 0.5,
        bits: int = 32,
        value_range: float | None = None,
        graph: str = "sparse",
        dropout_rate: float = 0.1,
        corruption_rate: float = 0.1,
        dropout: float = 0.0,
        dropout_stage: str = "input",
        seed: int = 0,
    ) -> None:
        if not isinstance(bits, int) or not 8 <= bits <= 64:
            raise ConfigError(
                "secure_aggregation.bits", f"must be an integer in [8, 64], got {bits!r}"
            )
        if value_range is not None and not value_range > 0:
            raise ConfigError("secure_aggregation.value_range", f"must be > 0, got {value_range!r}")
        if graph not in GRAPHS:
            raise ConfigError("secure_aggregation.graph", f"must be one of {GRAPHS}, got {graph!r}")
        for key, value in (("dropout_rate", dropout_rate), ("corruption_rate", corruption_rate)):
            if not 0 <= value < 1:
                raise ConfigError(f"secure_aggregation.{key}", f"must be in [0, 1), got {value!r}")
        if not 0 <= dropout < 1:
            raise ConfigError("secure_aggregation.dropout", f"must be in [0, 1), got {dropout!r}")
        if dropout_stage not in STAGES:
            raise ConfigError(
                "secure_aggregation.dropout_stage",
                f"must be one of {STAGES}, got {dropout_stage!r}",
            )
        self.protocol = SecAggPlusConfig(
            bits=bits,
            threshold=threshold,
            dropout_rate=dropout_rate,
            corruption_rate=corruption_rate,
            complete_graph=graph == "complete",
        )
        self.enabled, self.threshold, self.bits, self.graph = enabled, threshold, bits, graph
        self.value_range, self.dropout, self.seed = value_range, dropout, seed
        self.dropout_stage = dropout_stage

    def bind(self, dp_clip_norm: float | None, dp_local: bool) -> None:
        """Pick R: the DP clip norm bounds every coordinate of a clipped update."""
        if not self.enabled or self.value_range is not None:
            return
        if dp_clip_norm is None:
            raise ConfigError(
                "secure_aggregation.value_range",
                "is null: set it (the largest |update coordinate|), or enable privacy=dp_*",
            )
        self.value_range = dp_clip_norm * (8.0 if dp_local else 1.0)

    def start_round(self, cohort: list[int], round_idx: int, size: int) -> MaskingRound:
        """Stages 1 and 2 for ``cohort``; then clients mask their [``size``] updates one
        by one (:meth:`MaskingRound.submit`)."""
        return MaskingRound(self, list(cohort), round_idx, size)

    def drops(self, client_id: int, round_idx: int, stage: str) -> bool:
        """Whether the simulation makes this client fall silent at ``stage``."""
        if not self.dropout or stage != self.dropout_stage:
            return False
        gen = seeding.generator(self.seed, seeding.SECAGG, round_idx, client_id, 1)
        return float(torch.rand(1, generator=gen)) < self.dropout


class MaskingRound:
    """One SecAgg+ round of a fixed cohort, driven one client at a time; the server holds
    one running [P] ring sum whatever the cohort size (see the module docstring)."""

    def __init__(
        self, agg: SecureAggregation, cohort: list[int], round_idx: int, size: int
    ) -> None:
        self.agg, self.cohort, self.round_idx, self.size = agg, cohort, round_idx, size
        bits = agg.bits
        self.server = SecAggServer(round_idx, size, agg.protocol)
        block = agg.protocol.block
        self.clients = {c: SecAggClient(c, round_idx, size, bits, block) for c in cohort}
        for c in self._alive(cohort, "advertise"):
            self.server.receive_keys(_wire(self.clients[c].advertise_keys(), AdvertiseKeys))
        directories = self.server.close_keys()
        for c in self._alive(directories, "share"):
            directory = _wire(directories[c], KeyDirectory)
            self.server.receive_shares(_wire(self.clients[c].share_keys(directory), ShareKeys))
        self.forwarded = self.server.close_shares()
        self.masked = 0  # clients whose update reached the masking step
        self.clipped = 0  # coordinates clipped to +-R
        self.delivered: list[int] = []

    def _alive(self, ids, stage: str) -> list[int]:
        return [c for c in sorted(ids) if not self.agg.drops(c, self.round_idx, stage)]

    def submit(self, client_id: int, update: torch.Tensor) -> None:
        """Client ``client_id`` encodes and masks its update; the server adds the masked
        vector to the ring sum (unless the client dropped out before or at this stage)."""
        agg = self.agg
        ring, clipped = encode_fixed_point(update, agg.bits, agg.value_range, len(self.cohort))
        self.masked += 1
        self.clipped += clipped
        if client_id not in self.forwarded or not self._alive([client_id], "input"):
            return
        shares = _wire(self.forwarded[client_id], ForwardedShares)
        message = self.clients[client_id].masked_input(shares, ring)
        del ring
        self.server.receive_masked_input(_wire(message, MaskedInput))
        self.delivered.append(client_id)

    def unmask(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Stage 4: the survivors' shares, then the sum of the delivered inputs [P].

        Raises:
            SecAggAbort: too few clients delivered or answered to unmask safely.
        """
        requests = self.server.close_inputs()
        for c in self._alive(requests, "unmask"):
            request = _wire(requests[c], UnmaskRequest)
            self.server.receive_unmask(_wire(self.clients[c].unmask(request), UnmaskResponse))
        total = self.server.finish()
        agg = self.agg
        return decode_fixed_point(total, agg.bits, agg.value_range, len(self.cohort), dtype)


def _wire(message, kind):
    """``message`` as the other side receives it: serialized, then parsed and checked."""
    return kind.from_bytes(message.to_bytes())
