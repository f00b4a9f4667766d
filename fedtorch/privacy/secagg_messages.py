"""The SecAgg+ messages and their fixed, versioned byte format (no pickle).

Every message starts with the same 10-byte header, little-endian:

    magic "FSA+" (4 bytes) | version u8 (= VERSION) | kind u8 | round u32

followed by its fields in the order below (client ids are u32, counts u32, keys 32 bytes,
Shamir shares 66 bytes, sealed shares :data:`SEALED_BYTES` bytes):

    1 AdvertiseKeys    sender | mask_key | share_key
    2 KeyDirectory     recipient | threshold | count | count x (client | mask_key | share_key)
    3 ShareKeys        sender | count | count x (recipient | sealed share)
    4 ForwardedShares  recipient | count | count x (sender | sealed share)
    5 MaskedInput      sender | bits u8 | size u64 | size x ceil(bits/8) bytes of ring elements
    6 UnmaskRequest    recipient | count | survivor ids | count | dropped ids
    7 UnmaskResponse   sender | count | count x (owner | share of b) | count |
                       count x (owner | share of the mask key)

A sealed share is ``nonce || AES-256-GCM(plaintext) || tag``; its plaintext is
``version u8 | sender u32 | recipient u32 | share of b (66) | share of the mask key (66)``
and its associated data ``magic | version | round | sender | recipient``, so a share
moved to another round, sender or recipient does not decrypt.

Parsing (:func:`decode` or ``Class.from_bytes``) checks the magic, version, kind, exact
length, key sizes and that no id repeats; anything else raises
:class:`~fedtorch.privacy.secagg_errors.SecAggProtocolError`. Who may send what, and when,
is checked by the client and server objects.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from fedtorch.privacy.secagg_crypto import KEY_BYTES, Ring, sealed_size
from fedtorch.privacy.secagg_errors import SecAggInputError, SecAggProtocolError
from fedtorch.privacy.secagg_shamir import SHARE_BYTES, decode_share, encode_share

MAGIC = b"FSA+"
VERSION = 1
HEADER = struct.Struct("<4sBBI")
U32 = struct.Struct("<I")
MAX_ID = 2**32 - 2  # ids are u32 and id + 1 is a Shamir evaluation point
PLAINTEXT = struct.Struct(f"<BII{SHARE_BYTES}s{SHARE_BYTES}s")
SEALED_BYTES = sealed_size(PLAINTEXT.size)
AAD = struct.Struct("<4sBIII")


class PeerKeys(NamedTuple):
    """A neighbour's two public keys, as the server forwards them."""

    client: int
    mask_key: bytes
    share_key: bytes


class Reader:
    """Reads a message's fields in order; every read is bounds-checked."""

    def __init__(self, data: bytes | bytearray | memoryview, kind: int) -> None:
        self.view = memoryview(data).cast("B")
        if len(self.view) < HEADER.size:
            raise SecAggProtocolError(f"message of {len(self.view)} bytes is shorter than a header")
        magic, version, found, self.round_idx = HEADER.unpack_from(self.view, 0)
        if magic != MAGIC:
            raise SecAggProtocolError("not a SecAgg+ message (bad magic bytes)")
        if version != VERSION:
            raise SecAggProtocolError(f"message version {version}, this code speaks {VERSION}")
        if found != kind:
            raise SecAggProtocolError(f"expected message kind {kind}, got {found}")
        self.pos = HEADER.size

    def take(self, size: int) -> memoryview:
        if size < 0 or self.pos + size > len(self.view):
            raise SecAggProtocolError("message truncated")
        part = self.view[self.pos : self.pos + size]
        self.pos += size
        return part

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def count(self, item_bytes: int) -> int:
        """A u32 item count that the rest of the message can hold."""
        n = self.u32()
        if n * item_bytes > len(self.view) - self.pos:
            raise SecAggProtocolError(f"message claims {n} items but is too short")
        return n

    def ids(self) -> tuple[int, ...]:
        return unique(tuple(self.u32() for _ in range(self.count(4))))

    def end(self) -> None:
        if self.pos != len(self.view):
            raise SecAggProtocolError(f"{len(self.view) - self.pos} trailing bytes in message")


def header(kind: int, round_idx: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, round_idx)


def unique(ids: tuple[int, ...]) -> tuple[int, ...]:
    """``ids`` unchanged; raises on a repeated id."""
    if len(set(ids)) != len(ids):
        raise SecAggProtocolError("a client id repeats within one message")
    return ids


def check_key(key: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise SecAggProtocolError(f"public key of {len(key)} bytes, expected {KEY_BYTES}")
    return bytes(key)


def pack_ids(ids: Sequence[int]) -> bytes:
    return U32.pack(len(ids)) + b"".join(U32.pack(i) for i in ids)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 1, client -> server: the client's two X25519 public keys."""

    KIND: ClassVar[int] = 1
    round_idx: int
    sender: int
    mask_key: bytes
    share_key: bytes

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                header(self.KIND, self.round_idx),
                U32.pack(self.sender),
                self.mask_key,
                self.share_key,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> AdvertiseKeys:
        r = Reader(data, cls.KIND)
        msg = cls(r.round_idx, r.u32(), check_key(r.take(KEY_BYTES)), check_key(r.take(KEY_BYTES)))
        r.end()
        return msg


@dataclass(frozen=True)
class KeyDirectory:
    """Stage 1 -> 2, server -> one client: its neighbours' public keys and the threshold."""

    KIND: ClassVar[int] = 2
    round_idx: int
    recipient: int
    threshold: int
    neighbours: tuple[PeerKeys, ...]

    def to_bytes(self) -> bytes:
        parts = [header(self.KIND, self.round_idx), U32.pack(self.recipient)]
        parts += [U32.pack(self.threshold), U32.pack(len(self.neighbours))]
        parts += [U32.pack(p.client) + p.mask_key + p.share_key for p in self.neighbours]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KeyDirectory:
        r = Reader(data, cls.KIND)
        recipient, threshold = r.u32(), r.u32()
        peers = tuple(
            PeerKeys(r.u32(), check_key(r.take(KEY_BYTES)), check_key(r.take(KEY_BYTES)))
            for _ in range(r.count(4 + 2 * KEY_BYTES))
        )
        unique(tuple(p.client for p in peers))
        r.end()
        return cls(r.round_idx, recipient, threshold, peers)


def _pack_sealed(items: Sequence[tuple[int, bytes]]) -> bytes:
    for _, sealed in items:
        if len(sealed) != SEALED_BYTES:
            raise SecAggProtocolError(
                f"sealed share of {len(sealed)} bytes, expected {SEALED_BYTES}"
            )
    return U32.pack(len(items)) + b"".join(U32.pack(c) + s for c, s in items)


def _read_sealed(r: Reader) -> tuple[tuple[int, bytes], ...]:
    items = tuple((r.u32(), bytes(r.take(SEALED_BYTES))) for _ in range(r.count(4 + SEALED_BYTES)))
    unique(tuple(c for c, _ in items))
    return items


@dataclass(frozen=True)
class ShareKeys:
    """Stage 2, client -> server: one sealed share pair per neighbour, as
    ``(recipient, sealed)``."""

    KIND: ClassVar[int] = 3
    round_idx: int
    sender: int
    sealed: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return header(self.KIND, self.round_idx) + U32.pack(self.sender) + _pack_sealed(self.sealed)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ShareKeys:
        r = Reader(data, cls.KIND)
        msg = cls(r.round_idx, r.u32(), _read_sealed(r))
        r.end()
        return msg


@dataclass(frozen=True)
class ForwardedShares:
    """Stage 2 -> 3, server -> one client: the sealed shares addressed to it, as
    ``(sender, sealed)``; their senders are the neighbours it must mask with."""

    KIND: ClassVar[int] = 4
    round_idx: int
    recipient: int
    sealed: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return (
            header(self.KIND, self.round_idx) + U32.pack(self.recipient) + _pack_sealed(self.sealed)
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ForwardedShares:
        r = Reader(data, cls.KIND)
        msg = cls(r.round_idx, r.u32(), _read_sealed(r))
        r.end()
        return msg


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3, client -> server: y_i, ``size`` packed ring elements of Z_(2^bits)."""

    KIND: ClassVar[int] = 5
    META: ClassVar[struct.Struct] = struct.Struct("<IBQ")
    round_idx: int
    sender: int
    bits: int
    size: int
    payload: bytes | bytearray | memoryview

    def to_bytes(self) -> bytes:
        meta = self.META.pack(self.sender, self.bits, self.size)
        return b"".join([header(self.KIND, self.round_idx), meta, self.payload])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> MaskedInput:
        """Parse without copying the payload (it stays a view of ``data``)."""
        r = Reader(data, cls.KIND)
        sender, bits, size = cls.META.unpack(r.take(cls.META.size))
        try:
            wire = Ring(bits).wire_bytes
        except SecAggInputError as exc:
            raise SecAggProtocolError(f"masked input: {exc}") from None
        payload = r.take(size * wire)
        r.end()
        return cls(r.round_idx, sender, bits, size, payload)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3 -> 4, server -> one client: of its neighbours, those whose self-mask seed
    to reveal (``survivors``) and those whose mask key to reveal (``dropped``)."""

    KIND: ClassVar[int] = 6
    round_idx: int
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                header(self.KIND, self.round_idx),
                U32.pack(self.recipient),
                pack_ids(self.survivors),
                pack_ids(self.dropped),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> UnmaskRequest:
        r = Reader(data, cls.KIND)
        msg = cls(r.round_idx, r.u32(), r.ids(), r.ids())
        r.end()
        return msg


def _pack_shares(items: Sequence[tuple[int, int]]) -> bytes:
    return U32.pack(len(items)) + b"".join(U32.pack(o) + encode_share(v) for o, v in items)


def _read_shares(r: Reader) -> tuple[tuple[int, int], ...]:
    n = r.count(4 + SHARE_BYTES)
    items = tuple((r.u32(), decode_share(bytes(r.take(SHARE_BYTES)))) for _ in range(n))
    unique(tuple(o for o, _ in items))
    return items


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, client -> server: ``(owner, share)`` of the self-mask seeds of surviving
    neighbours and of the mask keys of dropped ones (never both for one owner)."""

    KIND: ClassVar[int] = 7
    round_idx: int
    sender: int
    seed_shares: tuple[tuple[int, int], ...]
    key_shares: tuple[tuple[int, int], ...]

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                header(self.KIND, self.round_idx),
                U32.pack(self.sender),
                _pack_shares(self.seed_shares),
                _pack_shares(self.key_shares),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> UnmaskResponse:
        r = Reader(data, cls.KIND)
        msg = cls(r.round_idx, r.u32(), _read_shares(r), _read_shares(r))
        r.end()
        return msg


Message = (
    AdvertiseKeys
    | KeyDirectory
    | ShareKeys
    | ForwardedShares
    | MaskedInput
    | UnmaskRequest
    | UnmaskResponse
)
KINDS: dict[int, type] = {
    cls.KIND: cls
    for cls in (
        AdvertiseKeys,
        KeyDirectory,
        ShareKeys,
        ForwardedShares,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
    )
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Any SecAgg+ message from its bytes (dispatching on the header's kind)."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size:
        raise SecAggProtocolError(f"message of {len(view)} bytes is shorter than a header")
    kind = view[5]
    if kind not in KINDS:
        raise SecAggProtocolError(f"unknown message kind {kind}")
    return KINDS[kind].from_bytes(view)


def share_plaintext(sender: int, recipient: int, seed_share: int, key_share: int) -> bytes:
    """The plaintext of one sealed share pair."""
    return PLAINTEXT.pack(
        VERSION, sender, recipient, encode_share(seed_share), encode_share(key_share)
    )


def read_share_plaintext(data: bytes, sender: int, recipient: int) -> tuple[int, int]:
    """``(share of b, share of the mask key)`` from a decrypted plaintext, checking that
    it names the expected sender and recipient."""
    if len(data) != PLAINTEXT.size:
        raise SecAggProtocolError(
            f"share plaintext of {len(data)} bytes, expected {PLAINTEXT.size}"
        )
    version, found_sender, found_recipient, seed, key = PLAINTEXT.unpack(data)
    if (version, found_sender, found_recipient) != (VERSION, sender, recipient):
        raise SecAggProtocolError(
            f"share plaintext names {found_sender}->{found_recipient} (v{version}), "
            f"expected {sender}->{recipient} (v{VERSION})"
        )
    return decode_share(seed), decode_share(key)


def share_associated_data(round_idx: int, sender: int, recipient: int) -> bytes:
    """The AES-GCM associated data of a share from ``sender`` to ``recipient``."""
    return AAD.pack(MAGIC, VERSION, round_idx, sender, recipient)
