"""The server's side of a SecAgg+ round (see :mod:`fedtorch.privacy.secagg_plus`).

A :class:`SecAggServer` lives for one round. For each stage it receives the clients'
messages one at a time (``receive_*``) and then closes the stage (``close_*``), which
fixes the set of clients that made it and returns the messages to send next. The masked
inputs are added to one running ring sum as they arrive, so its memory is one [P] vector
whatever the number of clients. Every received message is checked (round, sender, stage,
duplicates, shape) before use.

Set names follow Bonawitz et al.: U1 advertised keys, U2 shared keys, U3 sent a masked
input, U4 answered the unmask request.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import numpy as np
import torch

from fedtorch.errors import ConfigError
from fedtorch.privacy import secagg_shamir as shamir
from fedtorch.privacy.secagg_client import (
    DEFAULT_BLOCK,
    block_ranges,
    check_block,
    check_client_id,
    check_vector_size,
)
from fedtorch.privacy.secagg_crypto import Ring, pair_mask_key, public_key_of, self_mask_key
from fedtorch.privacy.secagg_errors import SecAggAbort, SecAggProtocolError
from fedtorch.privacy.secagg_graph import (
    MIN_CLIENTS,
    choose_degree,
    harary_graph,
    threshold_for,
)
from fedtorch.privacy.secagg_messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    PeerKeys,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)


@dataclass(frozen=True)
class SecAggPlusConfig:
    """Settings of a SecAgg+ round (the server sends ``bits`` and ``block`` to clients).

    Args:
        bits: the ring Z_(2^bits), 8 to 64.
        threshold: Shamir threshold t as a fraction of a client's neighbourhood
            (t = ceil(threshold k), at least 2); also the fewest clients that must remain
            at every stage.
        dropout_rate: the largest fraction of clients expected to drop out in a round;
            sizes the graph (see :mod:`fedtorch.privacy.secagg_graph`).
        corruption_rate: the largest fraction of clients that may collude with the
            server; sizes the graph.
        degree: force this graph degree k (even in [2, n - 2], or n - 1); null: the
            smallest k whose failure bound is below 2^-40.
        complete_graph: use Bonawitz's complete graph (k = n - 1) whatever the rates.
        block: ring elements processed at a time (memory O(block) beyond the sum).
    """

    bits: int = 32
    threshold: float = 0.5
    dropout_rate: float = 0.1
    corruption_rate: float = 0.1
    degree: int | None = None
    complete_graph: bool = False
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        Ring(self.bits)
        check_block(self.block)
        if not 0 < self.threshold <= 1:
            raise ConfigError(
                "secure_aggregation.threshold", f"must be in (0, 1], got {self.threshold!r}"
            )
        if self.degree is not None and (not isinstance(self.degree, int) or self.degree < 2):
            raise ConfigError(
                "secure_aggregation.degree", f"must be null or an integer >= 2, got {self.degree!r}"
            )

    def graph_for(self, num_clients: int) -> tuple[int, int]:
        """``(degree, threshold)`` of the graph on ``num_clients`` clients."""
        if self.complete_graph:
            degree = num_clients - 1
        elif self.degree is not None:
            degree = self.degree
        else:
            choice = choose_degree(
                num_clients, self.dropout_rate, self.corruption_rate, self.threshold
            )
            return choice.degree, choice.threshold
        return degree, threshold_for(degree, self.threshold)


class SecAggServer:
    """The server of one SecAgg+ round.

    Args:
        round_idx: the round; messages of other rounds are refused.
        size: P, the length of the aggregated vector.
        config: the protocol settings.

    Stages: ``receive_keys``* -> :meth:`close_keys` -> ``receive_shares``* ->
    :meth:`close_shares` -> ``receive_masked_input``* -> :meth:`close_inputs` ->
    ``receive_unmask``* -> :meth:`finish`.

    After :meth:`finish`, :attr:`total` is the [P] int64 ring sum of the inputs of U3.
    After an abort, :attr:`total` is None, the running sum is discarded
    (:attr:`holds_sum` is false), :attr:`aborted` holds the reason, and every later call
    raises the same :class:`SecAggAbort`.

    Raises:
        SecAggAbort: fewer than t clients left at a stage, or fewer than t shares for a
            reconstruction (checked for all reconstructions before any is made).
        SecAggProtocolError: a message from an unexpected sender, repeated, out of order,
            for another round, of the wrong shape; reconstructed key that does not match
            its public key.
    """

    def __init__(self, round_idx: int, size: int, config: SecAggPlusConfig | None = None) -> None:
        self.round_idx, self.size = round_idx, check_vector_size(size)
        self.config = config or SecAggPlusConfig()
        self.ring = Ring(self.config.bits)
        self.stage = 1
        self.degree = self.threshold = 0
        self.keys: dict[int, AdvertiseKeys] = {}  # U1
        self._public_keys: set[bytes] = set()
        self._shared: set[int] = set()  # U2 while stage 2 is open
        self.graph: dict[int, tuple[int, ...]] = {}
        self._mailbox: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> sealed
        self.forwarded: dict[int, frozenset[int]] = {}  # U2 member -> share senders it holds
        self.delivered: list[int] = []  # U3, in arrival order
        self._delivered: set[int] = set()
        self.requests: dict[int, UnmaskRequest] = {}
        self.responses: dict[int, UnmaskResponse] = {}  # U4
        self._sum: np.ndarray | None = None
        self.total: torch.Tensor | None = None
        self.aborted: str | None = None

    @property
    def holds_sum(self) -> bool:
        """Whether a running (masked) sum is held."""
        return self._sum is not None

    # Bookkeeping -----------------------------------------------------------------------

    def _abort(self, reason: str) -> SecAggAbort:
        """Discard everything that depends on the inputs and return the abort error."""
        self.aborted = f"round {self.round_idx}: secure aggregation aborted: {reason}"
        self._sum, self.total, self.responses = None, None, {}
        return SecAggAbort(self.aborted)

    def _check(
        self,
        stage: int,
        round_idx: int,
        sender: int,
        eligible: Container[int],
        done: Container[int],
    ) -> None:
        """Refuse a message after an abort, out of stage, for another round, from a client
        not ``eligible`` for this stage, or from one already ``done`` with it."""
        if self.aborted is not None:
            raise SecAggAbort(self.aborted)
        if self.stage != stage:
            raise SecAggProtocolError(
                f"server: stage-{stage} message from client {sender} during stage {self.stage}"
            )
        if round_idx != self.round_idx:
            raise SecAggProtocolError(
                f"server: message from client {sender} for round {round_idx}, in {self.round_idx}"
            )
        if sender not in eligible or sender in done:
            raise SecAggProtocolError(
                f"server: unexpected or repeated stage-{stage} message from client {sender}"
            )

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise self._abort(f"{count} clients {what}, threshold {self.threshold}")

    # Stage 1 ---------------------------------------------------------------------------

    def receive_keys(self, msg: AdvertiseKeys) -> None:
        """Stage 1: a client's public keys (each key must be new to the round)."""
        check_client_id(msg.sender)
        self._check(1, msg.round_idx, msg.sender, _ANY, self.keys)
        new = {msg.mask_key, msg.share_key}
        if len(new) != 2 or new & self._public_keys:
            raise SecAggProtocolError(f"server: client {msg.sender} reuses a public key")
        self._public_keys |= new
        self.keys[msg.sender] = msg

    def close_keys(self) -> dict[int, KeyDirectory]:
        """End stage 1: draw the graph on U1; each client's neighbours' keys."""
        self._advance(1)
        n = len(self.keys)
        if n < MIN_CLIENTS:
            raise self._abort(f"{n} clients advertised keys, at least {MIN_CLIENTS} needed")
        self.degree, self.threshold = self.config.graph_for(n)
        self.graph = harary_graph(self.keys, self.degree)
        self._mailbox = {c: {} for c in self.keys}
        return {
            c: KeyDirectory(
                self.round_idx,
                c,
                self.threshold,
                tuple(
                    PeerKeys(j, self.keys[j].mask_key, self.keys[j].share_key) for j in neighbours
                ),
            )
            for c, neighbours in self.graph.items()
        }

    def _advance(self, stage: int) -> None:
        if self.aborted is not None:
            raise SecAggAbort(self.aborted)
        if self.stage != stage:
            raise SecAggProtocolError(f"server: closing stage {stage} during stage {self.stage}")
        self.stage = stage + 1

    # Stage 2 ---------------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        """Stage 2: a client's sealed shares, one for each of its neighbours exactly."""
        self._check(2, msg.round_idx, msg.sender, self.keys, self._shared)
        recipients = [r for r, _ in msg.sealed]
        if sorted(recipients) != list(self.graph[msg.sender]):
            raise SecAggProtocolError(
                f"server: client {msg.sender} sealed shares for {sorted(recipients)}, "
                f"its neighbours are {list(self.graph[msg.sender])}"
            )
        for recipient, sealed in msg.sealed:
            self._mailbox[recipient][msg.sender] = sealed
        self._shared.add(msg.sender)

    def close_shares(self) -> dict[int, ForwardedShares]:
        """End stage 2: U2 = the clients that shared keys; forward to each member the
        shares other members of U2 sealed to it."""
        self._advance(2)
        u2 = self._shared
        self._require(len(u2), "shared keys")
        out = {}
        for c in sorted(u2):
            items = tuple(sorted((s, b) for s, b in self._mailbox[c].items() if s in u2))
            self.forwarded[c] = frozenset(s for s, _ in items)
            out[c] = ForwardedShares(self.round_idx, c, items)
        self._mailbox = {}
        return out

    # Stage 3 ---------------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Stage 3: add a client's masked vector to the running ring sum, block by block."""
        self._check(3, msg.round_idx, msg.sender, self.forwarded, self._delivered)
        if (msg.bits, msg.size) != (self.ring.bits, self.size):
            raise SecAggProtocolError(
                f"server: client {msg.sender} sent {msg.size} elements of {msg.bits} bits, "
                f"expected {self.size} of {self.ring.bits}"
            )
        if self._sum is None:
            self._sum = np.zeros(self.size, dtype=self.ring.dtype)
        for offset, count in block_ranges(self.size, self.config.block):
            self._sum[offset : offset + count] += self.ring.unpack(msg.payload, offset, count)
        self.delivered.append(msg.sender)
        self._delivered.add(msg.sender)

    def close_inputs(self) -> dict[int, UnmaskRequest]:
        """End stage 3: U3 = the clients whose masked input arrived. Ask each member for
        its shares of b_i (i in U3) and of the mask key of the neighbours that dropped
        after sharing keys, once every reconstruction is known to have t holders in U3."""
        self._advance(3)
        u3 = set(self.delivered)
        self._require(len(u3), "sent masked inputs")
        for owner, holders in self._holders(u3).items():
            if len(holders) < self.threshold:
                raise self._abort(
                    f"client {owner}'s secret is held by {len(holders)} survivors, "
                    f"threshold {self.threshold}"
                )
        self.requests = {
            c: UnmaskRequest(
                self.round_idx,
                c,
                tuple(sorted(self.forwarded[c] & u3)),
                tuple(sorted(self.forwarded[c] - u3)),
            )
            for c in sorted(u3)
        }
        return self.requests

    def _holders(self, responders: set[int]) -> dict[int, set[int]]:
        """For each secret to reconstruct (b_i of U3, the mask key of a dropped client that
        a member of U3 masked with), the ``responders`` holding a share of it."""
        holders: dict[int, set[int]] = {c: set() for c in self.delivered}
        for c in responders:
            for owner in self.forwarded[c]:
                holders.setdefault(owner, set()).add(c)
        return holders

    # Stage 4 ---------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Stage 4: a client's shares, exactly those that were requested from it."""
        self._check(4, msg.round_idx, msg.sender, self.requests, self.responses)
        request = self.requests[msg.sender]
        seeds = tuple(o for o, _ in msg.seed_shares)
        keys = tuple(o for o, _ in msg.key_shares)
        if (seeds, keys) != (request.survivors, request.dropped):
            raise SecAggProtocolError(
                f"server: client {msg.sender} answered with shares other than those requested"
            )
        self.responses[msg.sender] = msg

    def finish(self) -> torch.Tensor:
        """End stage 4: reconstruct the secrets, remove every mask from the running sum,
        and return the [P] int64 ring sum of U3's inputs."""
        self._advance(4)
        self._require(len(self.responses), "answered the unmask request")
        seeds, keys = self._collect_shares()
        for owner, shares in {**seeds, **keys}.items():
            if len(shares) < self.threshold:
                raise self._abort(
                    f"{len(shares)} shares of client {owner}'s secret arrived, "
                    f"threshold {self.threshold}"
                )
        total = self._sum if self._sum is not None else np.zeros(self.size, self.ring.dtype)
        self._sum = None  # from here on, any failure leaves no sum behind
        try:
            masks = self._pair_corrections(keys) + self._self_masks(seeds)
        except SecAggProtocolError as exc:
            self.aborted = f"round {self.round_idx}: secure aggregation aborted: {exc}"
            raise
        for offset, count in block_ranges(self.size, self.config.block):
            view = total[offset : offset + count]
            for key, sign in masks:
                mask = self.ring.mask_block(key, offset, count)
                if sign > 0:
                    view += mask
                else:
                    view -= mask
        self.total = self.ring.to_tensor(self.ring.reduce(total))
        return self.total

    def _collect_shares(self) -> tuple[dict[int, dict[int, int]], dict[int, dict[int, int]]]:
        """``{owner: {x: share}}`` of the self-mask seeds and of the dropped mask keys."""
        seeds: dict[int, dict[int, int]] = {c: {} for c in self.delivered}
        keys: dict[int, dict[int, int]] = {}
        for holder, msg in self.responses.items():
            for owner, value in msg.seed_shares:
                seeds[owner][holder + 1] = value
            for owner, value in msg.key_shares:
                keys.setdefault(owner, {})[holder + 1] = value
        for owner in {d for r in self.requests.values() for d in r.dropped}:
            keys.setdefault(owner, {})
        return seeds, keys

    def _self_masks(self, seeds: dict[int, dict[int, int]]) -> list[tuple[bytes, int]]:
        """``(PRG key, -1)``: remove PRG(b_i) of every client in U3."""
        masks = []
        for owner, shares in sorted(seeds.items()):
            seed = shamir.combine(shares, self.threshold)
            masks.append((self_mask_key(seed, self.round_idx, owner), -1))
        return masks

    def _pair_corrections(self, keys: dict[int, dict[int, int]]) -> list[tuple[bytes, int]]:
        """``(PRG key, sign)``: undo the pair masks that members of U3 added with a client
        d that dropped after sharing keys (member j added +PRG(s_jd) if d > j)."""
        delivered = set(self.delivered)
        masks = []
        for d, shares in sorted(keys.items()):
            private = shamir.combine(shares, self.threshold)
            if public_key_of(private) != self.keys[d].mask_key:
                raise SecAggProtocolError(
                    f"server: reconstructed mask key of client {d} does not match its public key"
                )
            for j in sorted(c for c in delivered if d in self.forwarded[c]):
                key = pair_mask_key(private, self.keys[j].mask_key, self.round_idx, d, j)
                masks.append((key, -1 if d > j else 1))
        return masks


class _Anyone:
    """A container that holds every client (stage 1 accepts any new id)."""

    def __contains__(self, client: object) -> bool:
        return True


_ANY = _Anyone()
