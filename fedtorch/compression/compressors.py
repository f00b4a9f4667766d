"""Update compressors: each encodes a flat update [P] into real tensors and decodes it back.

What a client sends is the :class:`Encoded` message: values, indices, scales and masks as
tensors of their natural dtypes, so the bytes counted are exactly the bytes of those
tensors (``Encoded.nbytes``), never a formula. The receiver knows the model's layout (the
size P and each key's shape), so neither is counted.

Each compressor ``C`` is a map of the update x; ``decode(encode(x))`` is what the server
aggregates. Randomised compressors (QSGD, rand-k, PowerSGD's initial matrix) draw from the
generator they are given, which the caller seeds from (seed, round, client).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedtorch.compression.bits import pack_bits, unpack_bits
from fedtorch.state.layout import KeySpec


@dataclass
class Encoded:
    """A compressed update: the tensors sent, by name, and the decoded length."""

    size: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The bytes on the wire: the sum of the parts' sizes."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class Compressor:
    """Base class, and the identity. ``lossless``: decode(encode(x)) == x, so error
    feedback has nothing to carry. ``randomized``: encode draws from its generator."""

    name = "none"
    lossless = True
    randomized = False

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        return Encoded(x.numel(), {"values": x.clone()})

    def decode(self, message: Encoded) -> torch.Tensor:
        return message.parts["values"].clone()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x, generator))


class NoCompression(Compressor):
    """The update itself, in its own dtype (4 bytes a value for float32)."""


class HalfPrecision(Compressor):
    """Cast to float16 or bfloat16 and back: 2 bytes a value. float16 overflows past
    65504 (the decoded value is then infinite, and the client's update is rejected);
    bfloat16 keeps float32's range with 8 bits of mantissa."""

    lossless = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        return Encoded(x.numel(), {"values": x.to(self.dtype)})

    def decode(self, message: Encoded) -> torch.Tensor:
        return message.parts["values"].to(torch.float32)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` zero-padded to a multiple of ``block``, as [blocks, block]."""
    pad = (-x.numel()) % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.reshape(-1, block)


class Int8Blocks(Compressor):
    """Per-block absmax int8 quantization (the blockwise scheme of 8-bit optimizers and
    LLM.int8's vector-wise scales): each block of ``block`` values gets the scale
    s = max|x| / 127 (float32) and sends q = round(x / s) in int8, so |x - s q| <= s / 2.
    A block of zeros sends s = 0 and q = 0."""

    name = "int8"
    lossless = False

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        blocks = _blocks(x.float(), self.block)
        scales = blocks.abs().amax(1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return Encoded(x.numel(), {"q": q.reshape(-1)[: x.numel()], "scales": scales})

    def decode(self, message: Encoded) -> torch.Tensor:
        q, scales = message.parts["q"], message.parts["scales"]
        values = _blocks(q.float(), self.block) * scales.unsqueeze(1)
        return values.reshape(-1)[: message.size]


class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017): for each bucket v of ``bucket`` values, with s levels,
    Q(v_i) = ||v||_2 sign(v_i) xi_i / s, where xi_i = l + 1 with probability
    s |v_i| / ||v|| - l and l otherwise (l = floor(s |v_i| / ||v||)). Unbiased, with
    E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2 for a bucket of d values.

    Sent: each bucket's norm (float32) and each value's signed level s + sign * xi in
    [0, 2s], packed in ceil(log2(2s + 1)) bits (fixed width: the paper's Elias coding of
    the levels would be smaller still at small s).
    """

    name = "qsgd"
    lossless = False
    randomized = True

    def __init__(self, levels: int = 16, bucket: int = 512) -> None:
        self.levels, self.bucket = levels, bucket
        self.width = max(1, math.ceil(math.log2(2 * levels + 1)))

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        s = self.levels
        blocks = _blocks(x.float(), self.bucket)
        norms = torch.linalg.vector_norm(blocks, dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        scaled = blocks.abs() / safe.unsqueeze(1) * s
        lower = scaled.floor()
        u = torch.rand(scaled.shape, generator=generator, device=x.device)
        level = lower + (u < scaled - lower).float()
        codes = (torch.sign(blocks) * level + s).reshape(-1)[: x.numel()]
        return Encoded(x.numel(), {"norms": norms, "levels": pack_bits(codes, self.width)})

    def decode(self, message: Encoded) -> torch.Tensor:
        s = self.levels
        codes = unpack_bits(message.parts["levels"], self.width, message.size)
        signed = (codes.float() - s) / s
        values = _blocks(signed, self.bucket) * message.parts["norms"].unsqueeze(1)
        return values.reshape(-1)[: message.size]


def _coordinates(count: int, fraction: float) -> int:
    """k = round(fraction * count), at least one coordinate."""
    return max(1, min(count, round(fraction * count)))


class Sparse(Compressor):
    """Shared encoding of top-k and rand-k: the chosen values (float32) and where they
    are, as int32 indices (4 bytes each) or as a bitmask of P bits, whichever is smaller
    (the bitmask wins above k / P = 1/32)."""

    lossless = False

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def choose(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, k: int, size: int) -> float:
        return 1.0

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        size = x.numel()
        k = _coordinates(size, self.fraction)
        index = self.choose(x, k, generator).sort().values
        values = x[index].float() * self.scale(k, size)
        index_dtype = torch.int32 if size < 2**31 else torch.int64
        index_bytes = 4 if index_dtype == torch.int32 else 8
        if k * index_bytes <= -(-size // 8):
            return Encoded(size, {"values": values, "indices": index.to(index_dtype)})
        mask = torch.zeros(size, dtype=torch.int64, device=x.device)
        mask[index] = 1
        return Encoded(size, {"values": values, "mask": pack_bits(mask, 1)})

    def decode(self, message: Encoded) -> torch.Tensor:
        parts = message.parts
        values = parts["values"]
        out = values.new_zeros(message.size)
        if "indices" in parts:
            out[parts["indices"].long()] = values
        else:
            mask = unpack_bits(parts["mask"], 1, message.size).bool()
            out[mask] = values
        return out


class TopK(Sparse):
    """Top-k sparsification (Stich et al. 2018; Aji and Heafield 2017): the k = fraction·P
    values of largest |x_i|, over the whole update; the rest are zero (and, with error
    feedback, carried to the client's next update)."""

    name = "topk"

    def choose(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.topk(x.abs(), k, sorted=False).indices


class RandK(Sparse):
    """Rand-k sparsification (Stich et al. 2018): k = fraction·P coordinates drawn
    uniformly without replacement from (seed, round, client). ``unbiased=true`` scales
    the kept values by P / k, so E[C(x)] = x (the form used without error feedback);
    false keeps them as they are (the contraction used with error feedback)."""

    name = "randk"
    randomized = True

    def __init__(self, fraction: float, unbiased: bool = False) -> None:
        super().__init__(fraction)
        self.unbiased = unbiased

    def choose(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randperm(x.numel(), generator=generator, device=x.device)[:k]

    def scale(self, k: int, size: int) -> float:
        return size / k if self.unbiased else 1.0


class ScaledSign(Compressor):
    """Scaled sign (Karimireddy et al. 2019, EF-SignSGD): per model key (tensor) x of d
    values, C(x) = (||x||_1 / d) sign(x). Sent: one float32 scale per key and one bit per
    value (a zero counts as +)."""

    name = "signsgd"
    lossless = False

    def __init__(self, segments: Sequence[KeySpec]) -> None:
        self.segments = list(segments)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        scales = (
            torch.stack(
                [x[s.offset : s.offset + s.numel].abs().float().mean() for s in self.segments]
            )
            if self.segments
            else x.new_zeros(0)
        )
        return Encoded(x.numel(), {"scales": scales, "signs": pack_bits(x >= 0, 1)})

    def decode(self, message: Encoded) -> torch.Tensor:
        signs = unpack_bits(message.parts["signs"], 1, message.size).float() * 2 - 1
        lengths = torch.tensor([s.numel for s in self.segments], device=signs.device)
        return signs * message.parts["scales"].repeat_interleave(lengths)


class PowerSGD(Compressor):
    """PowerSGD (Vogels et al. 2019), one power iteration: each key with two or more
    dimensions is viewed as a matrix M [n, m] and sent as P [n, r] and Q [m, r] with
    Q0 ~ N(0, 1) drawn from (seed, round, client), P = orth(M Q0), Q = M^T P; the server
    decodes P Q^T, the best rank-r approximation within the span of M Q0. Keys with one
    dimension, and matrices where r (n + m) >= n m, are sent as they are (float32).

    Vogels et al. reuse Q between steps (warm start); a federated client is sampled too
    rarely for that to help, so Q0 is fresh each time. The paper uses error feedback.
    """

    name = "powersgd"
    lossless = False
    randomized = True

    def __init__(self, segments: Sequence[KeySpec], rank: int = 4) -> None:
        self.segments, self.rank = list(segments), rank

    def _low_rank(self, spec: KeySpec) -> tuple[int, int] | None:
        if len(spec.shape) < 2:
            return None
        n = spec.shape[0]
        m = spec.numel // max(n, 1)
        return (n, m) if self.rank * (n + m) < n * m else None

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        parts: dict[str, torch.Tensor] = {}
        for i, spec in enumerate(self.segments):
            segment = x[spec.offset : spec.offset + spec.numel].float()
            shape = self._low_rank(spec)
            if shape is None:
                parts[f"{i}.raw"] = segment.clone()
                continue
            matrix = segment.view(shape)
            q0 = torch.randn(shape[1], self.rank, generator=generator, device=x.device)
            p = torch.linalg.qr(matrix @ q0).Q
            parts[f"{i}.p"], parts[f"{i}.q"] = p, matrix.T @ p
        return Encoded(x.numel(), parts)

    def decode(self, message: Encoded) -> torch.Tensor:
        parts = message.parts
        pieces = []
        for i, _ in enumerate(self.segments):
            if f"{i}.raw" in parts:
                pieces.append(parts[f"{i}.raw"])
            else:
                pieces.append((parts[f"{i}.p"] @ parts[f"{i}.q"].T).reshape(-1))
        return torch.cat(pieces) if pieces else torch.zeros(message.size)
