"""Cryptographic building blocks of SecAgg+, all from pyca ``cryptography``.

- Key agreement: X25519 (:func:`agree`, the one code path for every Diffie-Hellman in
  the protocol: pair masks, share encryption, and the server's recovery of a dropped
  client's pair masks).
- Key derivation: HKDF-SHA256 with a label naming the protocol version, the purpose and
  the round and client ids (:func:`derive_key`), so no key serves two purposes.
- Share encryption: AES-256-GCM with a random 96-bit nonce and associated data that binds
  the version, round, sender and recipient (:func:`seal`, :func:`open_sealed`).
- Mask expansion: the AES-256-CTR keystream of a derived key, read as little-endian
  integers and reduced mod 2^bits (:meth:`Ring.mask_block`). The keystream is a
  pseudorandom function of the key and the byte position, so any block of a mask can be
  produced on its own: a mask of P values never needs more than one block of memory.

:class:`Ring` is Z_(2^bits) for 8 <= bits <= 64 on numpy arrays of the smallest unsigned
type that holds ``bits`` bits (uint8/16/32/64). Unsigned numpy arithmetic wraps modulo
2^width, and 2^bits divides 2^width, so sums of ring elements can be reduced once, at the
end, instead of after every addition. On the wire an element takes ceil(bits / 8) bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtorch.privacy.secagg_errors import SecAggInputError, SecAggProtocolError

KEY_BYTES = 32  # X25519 keys, HKDF outputs, AES-256 keys, seeds
NONCE_BYTES = 12
TAG_BYTES = 16
LABEL = b"fedtorch-secagg+/v1/"
AES_BLOCK = 16
MIN_BITS, MAX_BITS = 8, 64


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 ``(private, public)`` pair of raw 32-byte keys (OS CSPRNG)."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret of our raw private key and a peer's raw public key.

    Raises:
        SecAggProtocolError: a key of the wrong length, or a low-order public key (the
            shared secret would be all zeros).
    """
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:
        raise SecAggProtocolError(f"X25519 key agreement failed: {exc}") from None


def derive_key(secret: bytes, purpose: bytes, *context: int) -> bytes:
    """A 32-byte key from ``secret`` by HKDF-SHA256, bound to ``purpose`` and ``context``
    (round and client ids)."""
    info = LABEL + purpose + struct.pack(f"<{len(context)}Q", *context)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def pair_mask_key(mask_private: bytes, peer_public: bytes, round_idx: int, a: int, b: int) -> bytes:
    """The PRG key of the pair mask between clients ``a`` and ``b`` (symmetric in a, b)."""
    shared = agree(mask_private, peer_public)
    return derive_key(shared, b"pair-mask", round_idx, min(a, b), max(a, b))


def self_mask_key(seed: bytes, round_idx: int, client: int) -> bytes:
    """The PRG key of a client's self mask from its 32-byte seed b_i."""
    return derive_key(seed, b"self-mask", round_idx, client)


def share_cipher_key(
    share_private: bytes, peer_public: bytes, round_idx: int, a: int, b: int
) -> bytes:
    """The AES-256-GCM key that protects shares between clients ``a`` and ``b``."""
    shared = agree(share_private, peer_public)
    return derive_key(shared, b"share-key", round_idx, min(a, b), max(a, b))


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``nonce || AES-256-GCM(plaintext) || tag`` with a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`.

    Raises:
        SecAggProtocolError: the tag does not verify (wrong key, tampered ciphertext or
            associated data).
    """
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggProtocolError(
            "share decryption failed (AES-GCM tag invalid: wrong key or tampered message)"
        ) from None


def sealed_size(plaintext_bytes: int) -> int:
    """Bytes of :func:`seal`'s output for a plaintext of ``plaintext_bytes``."""
    return NONCE_BYTES + plaintext_bytes + TAG_BYTES


@lru_cache(maxsize=8)
def _zeros(size: int) -> bytes:
    return bytes(size)


@dataclass(frozen=True)
class Ring:
    """Z_(2^bits) on numpy arrays; see the module docstring."""

    bits: int

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise SecAggInputError(
                f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}"
            )

    @property
    def dtype(self) -> np.dtype:
        """The little-endian unsigned numpy type that holds an element."""
        width = next(w for w in (1, 2, 4, 8) if 8 * w >= self.bits)
        return np.dtype(f"<u{width}")

    @property
    def wire_bytes(self) -> int:
        """Bytes an element takes in a message: ceil(bits / 8)."""
        return (self.bits + 7) // 8

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """``values`` mod 2^bits, in place (a no-op when bits fills the type)."""
        if self.bits < 8 * self.dtype.itemsize:
            values &= self.dtype.type((1 << self.bits) - 1)
        return values

    def mask_block(self, key: bytes, offset: int, count: int) -> np.ndarray:
        """Elements ``offset .. offset + count`` of the mask expanded from ``key``: the
        AES-256-CTR keystream read as integers (not yet reduced, see :meth:`reduce`)."""
        width = self.dtype.itemsize
        start = offset * width
        skip = start % AES_BLOCK
        counter = (start // AES_BLOCK).to_bytes(AES_BLOCK, "big")
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        stream = encryptor.update(_zeros(skip + count * width))
        return np.frombuffer(stream, dtype=self.dtype, count=count, offset=skip)

    def pack(self, values: np.ndarray) -> bytes:
        """Reduced elements as ``wire_bytes`` little-endian bytes each."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        width = self.dtype.itemsize
        if self.wire_bytes == width:
            return values.tobytes()
        return values.view(np.uint8).reshape(-1, width)[:, : self.wire_bytes].tobytes()

    def unpack(self, data: bytes | bytearray | memoryview, offset: int, count: int) -> np.ndarray:
        """``count`` elements of a packed buffer starting at element ``offset``."""
        wire, width = self.wire_bytes, self.dtype.itemsize
        if wire == width:
            return np.frombuffer(data, dtype=self.dtype, count=count, offset=offset * wire)
        raw = np.frombuffer(data, dtype=np.uint8, count=count * wire, offset=offset * wire)
        wide = np.zeros((count, width), dtype=np.uint8)
        wide[:, :wire] = raw.reshape(count, wire)
        return wide.view(self.dtype).reshape(count)

    def from_tensor(self, values: torch.Tensor) -> np.ndarray:
        """A [n] int64 tensor of ring elements as this ring's numpy type (a copy).

        For bits = 64 an int64 is read as its two's-complement bit pattern.

        Raises:
            SecAggInputError: a value outside [0, 2^bits) (bits < 64).
        """
        if values.dtype != torch.int64 or values.dim() != 1:
            raise SecAggInputError(
                f"inputs must be [n] int64 ring elements, got {values.dtype} of shape "
                f"{tuple(values.shape)}"
            )
        array = values.detach().cpu().numpy()
        if self.bits < 64 and array.size and (array.min() < 0 or array.max() >> self.bits):
            raise SecAggInputError(
                f"inputs must be ring elements in [0, 2^{self.bits}), got values in "
                f"[{int(array.min())}, {int(array.max())}]"
            )
        return array.astype(self.dtype, casting="unsafe")

    def to_tensor(self, values: np.ndarray) -> torch.Tensor:
        """Reduced elements as a [n] int64 tensor (bits = 64: two's complement, sharing
        memory with ``values``)."""
        if self.dtype.itemsize == 8:
            return torch.from_numpy(np.ascontiguousarray(values).view(np.int64))
        return torch.from_numpy(values.astype(np.int64))
