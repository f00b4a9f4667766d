"""The client's side of a SecAgg+ round (see :mod:`fedtorch.privacy.secagg_plus`).

A :class:`SecAggClient` lives for one round. Its four methods are the four stages, each
taking the server's message of the previous stage and returning the client's next
message; calling them out of order, twice, or with a message for another round or client
raises :class:`~fedtorch.privacy.secagg_errors.SecAggProtocolError`. Its secrets (two
X25519 private keys and the self-mask seed b_i) come from the OS CSPRNG and never leave it
except as Shamir shares sealed to its neighbours.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fedtorch.privacy import secagg_shamir as shamir
from fedtorch.privacy.secagg_crypto import (
    KEY_BYTES,
    Ring,
    generate_key_pair,
    open_sealed,
    pair_mask_key,
    seal,
    self_mask_key,
    share_cipher_key,
)
from fedtorch.privacy.secagg_errors import SecAggAbort, SecAggInputError, SecAggProtocolError
from fedtorch.privacy.secagg_messages import (
    MAX_ID,
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    PeerKeys,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    read_share_plaintext,
    share_associated_data,
    share_plaintext,
)

DEFAULT_BLOCK = 1 << 16  # ring elements masked at a time (256 KiB of uint32)


def check_client_id(client_id: int) -> int:
    """``client_id`` if it fits the wire format (a u32 whose successor is a u32)."""
    if not isinstance(client_id, int) or not 0 <= client_id <= MAX_ID:
        raise SecAggInputError(f"client ids must be integers in [0, {MAX_ID}], got {client_id!r}")
    return client_id


def check_vector_size(size: int) -> int:
    """``size`` if it is a positive vector length."""
    if not isinstance(size, int) or size < 1:
        raise SecAggInputError(f"vector size must be a positive integer, got {size!r}")
    return size


def check_block(block: int) -> int:
    """``block`` if it is a positive multiple of 16 (so blocks start on AES blocks)."""
    if not isinstance(block, int) or block < 16 or block % 16:
        raise SecAggInputError(f"block size must be a positive multiple of 16, got {block!r}")
    return block


def block_ranges(size: int, block: int) -> list[tuple[int, int]]:
    """``(offset, count)`` of consecutive blocks covering a [size] vector."""
    return [(o, min(block, size - o)) for o in range(0, size, block)]


class SecAggClient:
    """One client of one SecAgg+ round.

    Args:
        client_id: the client's id (its Shamir evaluation point is id + 1).
        round_idx: the round; every message is bound to it.
        size: P, the length of the vector to aggregate.
        bits: the ring Z_(2^bits) (8 to 64).
        block: ring elements masked at a time: extra memory is O(block), not O(P).

    Stages: :meth:`advertise_keys` -> :meth:`share_keys` -> :meth:`masked_input` ->
    :meth:`unmask`.

    Raises:
        SecAggProtocolError: a message for another round or client, out of order, naming
            non-neighbours, or a share that does not decrypt (AES-GCM tag invalid).
        SecAggAbort: fewer neighbours delivered shares than the threshold (stage 3).
        SecAggInputError: a bad id, size, block or input vector.
    """

    def __init__(
        self, client_id: int, round_idx: int, size: int, bits: int, block: int = DEFAULT_BLOCK
    ) -> None:
        self.client_id = check_client_id(client_id)
        self.round_idx, self.size = round_idx, check_vector_size(size)
        self.ring, self.block = Ring(bits), check_block(block)
        self._mask_private, self.mask_public = generate_key_pair()
        self._share_private, self.share_public = generate_key_pair()
        self._seed: bytes | None = os.urandom(KEY_BYTES)
        self._stage = 0
        self._neighbours: dict[int, PeerKeys] = {}
        self._threshold = 0
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (share of b, share of key)

    # Stage bookkeeping -----------------------------------------------------------------

    def _enter(self, stage: int, round_idx: int, recipient: int | None = None) -> None:
        if self._stage != stage - 1:
            raise SecAggProtocolError(
                f"client {self.client_id}: stage {stage} requested after stage {self._stage}"
            )
        if round_idx != self.round_idx:
            raise SecAggProtocolError(
                f"client {self.client_id}: message for round {round_idx}, in {self.round_idx}"
            )
        if recipient is not None and recipient != self.client_id:
            raise SecAggProtocolError(
                f"client {self.client_id}: message addressed to client {recipient}"
            )
        self._stage = stage

    # Stage 1 ---------------------------------------------------------------------------

    def advertise_keys(self) -> AdvertiseKeys:
        """Stage 1: the two public keys (mask agreement, share encryption)."""
        self._enter(1, self.round_idx)
        return AdvertiseKeys(self.round_idx, self.client_id, self.mask_public, self.share_public)

    # Stage 2 ---------------------------------------------------------------------------

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Stage 2: Shamir-share b_i and the mask private key among the neighbours of
        ``directory``, each pair of shares sealed to its recipient."""
        self._enter(2, directory.round_idx, directory.recipient)
        self._check_directory(directory)
        self._neighbours = {p.client: p for p in directory.neighbours}
        self._threshold = directory.threshold
        points = [j + 1 for j in self._neighbours]
        seed_shares = shamir.split(self._seed, points, self._threshold)
        key_shares = shamir.split(self._mask_private, points, self._threshold)
        sealed = []
        for j, peer in sorted(self._neighbours.items()):
            key = share_cipher_key(
                self._share_private, peer.share_key, self.round_idx, self.client_id, j
            )
            plain = share_plaintext(self.client_id, j, seed_shares[j + 1], key_shares[j + 1])
            aad = share_associated_data(self.round_idx, self.client_id, j)
            sealed.append((j, seal(key, plain, aad)))
        return ShareKeys(self.round_idx, self.client_id, tuple(sealed))

    def _check_directory(self, directory: KeyDirectory) -> None:
        ids = [p.client for p in directory.neighbours]
        if self.client_id in ids:
            raise SecAggProtocolError(f"client {self.client_id}: listed as its own neighbour")
        if not 2 <= directory.threshold <= len(ids):
            raise SecAggProtocolError(
                f"client {self.client_id}: threshold {directory.threshold} with "
                f"{len(ids)} neighbours"
            )
        own = {self.mask_public, self.share_public}
        keys = [k for p in directory.neighbours for k in (p.mask_key, p.share_key)]
        if len(set(keys)) != len(keys) or own & set(keys):
            raise SecAggProtocolError(f"client {self.client_id}: repeated public keys")
        for i in ids:
            check_client_id(i)

    # Stage 3 ---------------------------------------------------------------------------

    def masked_input(self, forwarded: ForwardedShares, values: torch.Tensor) -> MaskedInput:
        """Stage 3: decrypt the neighbours' shares, then send
        y = x + PRG(b_i) + sum_j +-PRG(s_ij) mod 2^bits over the neighbours j that
        delivered shares (+ for j > i, - for j < i).

        Args:
            forwarded: the shares the server forwarded to this client.
            values: x, a [P] int64 tensor of ring elements in [0, 2^bits).
        """
        self._enter(3, forwarded.round_idx, forwarded.recipient)
        self._open_shares(forwarded)
        if len(self._held) < self._threshold:
            raise SecAggAbort(
                f"client {self.client_id}: {len(self._held)} neighbours delivered shares, "
                f"threshold {self._threshold}"
            )
        if values.shape != (self.size,):
            raise SecAggInputError(
                f"client {self.client_id}: input of shape {tuple(values.shape)}, "
                f"expected ({self.size},)"
            )
        masks = [(self_mask_key(self._seed, self.round_idx, self.client_id), 1)]
        for j in sorted(self._held):
            key = pair_mask_key(
                self._mask_private, self._neighbours[j].mask_key, self.round_idx, self.client_id, j
            )
            masks.append((key, 1 if j > self.client_id else -1))
        payload = bytearray(self.size * self.ring.wire_bytes)
        for offset, count in block_ranges(self.size, self.block):
            block = self._mask_block(values[offset : offset + count], masks, offset, count)
            wire = self.ring.wire_bytes
            payload[offset * wire : (offset + count) * wire] = self.ring.pack(block)
        # The secrets are no longer needed by this client: only its neighbours' shares are.
        self._seed = None
        self._mask_private = b""
        return MaskedInput(self.round_idx, self.client_id, self.ring.bits, self.size, payload)

    def _open_shares(self, forwarded: ForwardedShares) -> None:
        for sender, sealed in forwarded.sealed:
            peer = self._neighbours.get(sender)
            if peer is None:
                raise SecAggProtocolError(
                    f"client {self.client_id}: forwarded share from non-neighbour {sender}"
                )
            key = share_cipher_key(
                self._share_private, peer.share_key, self.round_idx, sender, self.client_id
            )
            aad = share_associated_data(self.round_idx, sender, self.client_id)
            try:
                plain = open_sealed(key, sealed, aad)
            except SecAggProtocolError as exc:
                raise SecAggProtocolError(
                    f"client {self.client_id}: share from client {sender}: {exc}"
                ) from None
            self._held[sender] = read_share_plaintext(plain, sender, self.client_id)

    def _mask_block(
        self, values: torch.Tensor, masks: list[tuple[bytes, int]], offset: int, count: int
    ) -> np.ndarray:
        """One block of y: the input block plus every mask's block, reduced."""
        block = self.ring.from_tensor(values)
        for key, sign in masks:
            mask = self.ring.mask_block(key, offset, count)
            if sign > 0:
                block += mask
            else:
                block -= mask
        return self.ring.reduce(block)

    # Stage 4 ---------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: shares of b_j for the surviving neighbours and of the mask key of the
        dropped ones. Answered once per round, and never for one neighbour in both lists,
        so the server can never hold both secrets of a client."""
        self._enter(4, request.round_idx, request.recipient)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggProtocolError(
                f"client {self.client_id}: asked for both secrets of {sorted(survivors & dropped)}"
            )
        unknown = (survivors | dropped) - set(self._held)
        if unknown:
            raise SecAggProtocolError(
                f"client {self.client_id}: asked for shares it does not hold: {sorted(unknown)}"
            )
        seeds = tuple((i, self._held[i][0]) for i in sorted(survivors))
        keys = tuple((i, self._held[i][1]) for i in sorted(dropped))
        self._held = {}
        return UnmaskResponse(self.round_idx, self.client_id, seeds, keys)
