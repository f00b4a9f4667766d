"""Messages between the ranks of ``engine=distributed``: tensors and a typed, versioned header.

Nothing a rank receives is unpickled or executed. A message from one rank to another is

    int64[1]      the header's length in bytes, checked against the receiver's cap before
                  anything is allocated
    uint8[length] the header: a UTF-8 JSON object ``{"v": VERSION, "kind": KIND, ...fields,
                  "payload": [{"dtype": D, "shape": [...]}, ...]}``
    tensors       the payloads the header announces, in its order (empty ones are not sent)

The receiver names the kinds it expects; the header must carry this module's ``VERSION``,
one of those kinds, exactly the fields of that kind's schema (:data:`KINDS`: integers and
numbers in ranges, flags, strings from allow-lists, short printable text, lists of bounded
length) and one payload entry per payload the kind declares, each with a dtype from
:data:`DTYPES`. The caller then receives each payload only after checking the announced
dtype and shape against what it assigned (:func:`receive_payload`), so no peer sizes an
allocation beyond that. Anything else stops the run with one line, a
:class:`MessageError` naming the sending rank and what it sent.

The kinds and their schemas are one table (:data:`KINDS`). An ``updates`` row is what the
client side sent (clipped and noised under DP, the decoded update under compression) and
its report carries the client side's receipt. A kind that carries something new (encoded
or masked updates from the rank that trained the clients, say) is a new entry there, with
its own fields and payloads, and a new ``VERSION`` if an existing kind changes. Control
announcements from rank 0 (start a round, evaluate, stop) are a fixed ``int64[3]`` tensor,
``[VERSION, code, value]`` (:data:`ANNOUNCEMENTS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from fedtorch.errors import FedtorchError

VERSION = 2  # 2: tasks carry the clip norm, reports the client side's receipt

# Bounds on what a peer may announce, before anything it announces is allocated.
MAX_INT = 2**53  # integers in a header (ids, counts, sizes): exact in a float64 too
MAX_CLIENTS = 1 << 24  # clients in one message
MAX_STEPS = 1 << 40  # local steps a client reports
MAX_COUNTER_VALUES = 1 << 20  # values of the max-rule keys a client reports
MAX_REASON_CHARS = 400  # a failed client's reason (printable ASCII)
MAX_DIMS = 4  # dimensions of a payload tensor
MAX_HEADER_BYTES = 64 << 20  # any header, whatever the receiver's own cap
HEADER_BASE_BYTES = 4096  # a header's fixed part (kind, version, payload specs)
TASK_BYTES = 320  # one task in a ``tasks`` header (a chunk's own fields included)
ITEM_BYTES = 1024  # one report in an ``updates`` header, counters aside
COUNTER_VALUE_BYTES = 26  # one counter value in a report

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# What a client's report may carry in its metrics (the client trainer's statistics).
METRIC_NAMES = ("train_loss", "train_accuracy", "steps", "initial_loss", "epsilon")


class MessageError(FedtorchError):
    """A rank sent a message this rank cannot accept: malformed, oversized, of an
    unexpected kind or version, or reporting what it was not asked for. The line names
    the rank and what it sent. It is not a :class:`DistributedError` (a lost peer), so no
    handler that carries on without a lost rank swallows it."""

    def __init__(self, src: int | str, problem: str) -> None:
        self.src = src
        who = f"rank {src}" if isinstance(src, int) else f"one of ranks {src}"
        super().__init__(f"distributed: {who} sent {problem}")


class Invalid(ValueError):
    """A value does not fit its schema (wrapped into a :class:`MessageError`)."""


def show(value: Any, limit: int = 60) -> str:
    """A short, one-line, printable rendering of what a peer sent."""
    text = repr(value)
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Field types ---------------------------------------------------------------------------


class Field(Protocol):
    def check(self, value: Any, where: str) -> Any: ...


@dataclass(frozen=True)
class Int:
    """An integer (not a bool) in [lo, hi]."""

    lo: int = 0
    hi: int = MAX_INT

    def check(self, value: Any, where: str) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise Invalid(
                f"{where} must be an integer in [{self.lo}, {self.hi}], got {show(value)}"
            )
        return value


@dataclass(frozen=True)
class Number:
    """An int or float in [lo, hi]; NaN and infinities only if ``finite`` is false."""

    finite: bool = True
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, where: str) -> int | float:
        if type(value) not in (int, float):
            raise Invalid(f"{where} must be a number, got {show(value)}")
        if type(value) is int and abs(value) > MAX_INT:
            raise Invalid(f"{where} must be at most {MAX_INT} in size, got {show(value)}")
        if math.isfinite(value):
            if not self.lo <= value <= self.hi:
                raise Invalid(f"{where} must be in [{self.lo}, {self.hi}], got {show(value)}")
        elif self.finite:
            raise Invalid(f"{where} must be a finite number, got {show(value)}")
        return value


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def check(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise Invalid(f"{where} must be true or false, got {show(value)}")
        return value


@dataclass(frozen=True)
class Choice:
    """A string from an allow-list."""

    values: tuple[str, ...]

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str or value not in self.values:
            raise Invalid(f"{where} must be one of {', '.join(self.values)}, got {show(value)}")
        return value


@dataclass(frozen=True)
class Text:
    """Printable ASCII of at most ``max_chars`` characters (shown in logs, never parsed)."""

    max_chars: int

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str or len(value) > self.max_chars:
            raise Invalid(f"{where} must be text of at most {self.max_chars} characters")
        if any(not " " <= c <= "~" for c in value):
            raise Invalid(f"{where} must be printable ASCII, got {show(value)}")
        return value


@dataclass(frozen=True)
class Maybe:
    """null, or a value of ``inner``."""

    inner: Field

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)


@dataclass(frozen=True)
class ListOf:
    """A list of at most ``max_items`` values of ``item``."""

    item: Field
    max_items: int

    def check(self, value: Any, where: str) -> list[Any]:
        if type(value) is not list:
            raise Invalid(f"{where} must be a list, got {show(value)}")
        if len(value) > self.max_items:
            raise Invalid(f"{where} has {len(value)} entries, at most {self.max_items} allowed")
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Record:
    """An object with exactly these keys (those in ``optional`` may be left out)."""

    fields: Mapping[str, Field]
    optional: frozenset[str] = frozenset()

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise Invalid(f"{where} must be an object, got {show(value)}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise Invalid(f"{where} has a field {show(unknown[0])} its schema does not allow")
        missing = [k for k in self.fields if k not in value and k not in self.optional]
        if missing:
            raise Invalid(f"{where} lacks its field {missing[0]!r}")
        return {k: self.fields[k].check(v, f"{where}.{k}") for k, v in value.items()}


@dataclass(frozen=True)
class Tagged:
    """One of several records, told apart by the string in field ``tag``."""

    tag: str
    variants: Mapping[str, Record]

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise Invalid(f"{where} must be an object, got {show(value)}")
        name = Choice(tuple(self.variants)).check(value.get(self.tag), f"{where}.{self.tag}")
        body = {k: v for k, v in value.items() if k != self.tag}
        return {self.tag: name, **self.variants[name].check(body, where)}


# The kinds and their schemas ----------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A message kind: its header fields and the names of the payloads it carries."""

    fields: Mapping[str, Field]
    payloads: tuple[str, ...] = ()
    doc: str = ""


CLIENT = Int(0, MAX_CLIENTS)
TASK = Record(
    {
        "client": CLIENT,
        "steps": Maybe(Int(0, MAX_STEPS)),
        "prox_mu": Number(lo=0.0),
        "flip_labels": Flag(),
        "initial_loss": Flag(),
        "correction": Flag(),  # the next row of payload "corrections" is this task's
        "step_correction": Flag(),  # the next row of payload "step_corrections"
    }
)
CHUNK = Record({"flush": Flag(), "tasks": ListOf(TASK, MAX_CLIENTS)})
METRICS = Record(
    {
        "train_loss": Number(finite=False),
        "train_accuracy": Number(finite=False),
        "steps": Int(0, MAX_STEPS),
        "initial_loss": Number(finite=False),
        "epsilon": Number(finite=False),
    },
    optional=frozenset(METRIC_NAMES),
)
RESULT = Record(
    {
        "client": CLIENT,
        "samples": Int(0, MAX_INT),
        "metrics": METRICS,
        "counters": ListOf(Number(finite=False), MAX_COUNTER_VALUES),
        # The client side's receipt (fedtorch.server.round_pipeline.RoundClientSide): the
        # encoded update's bytes (compression) and adaptive clipping's bit (DP).
        "sent_bytes": Int(0, MAX_INT),
        "within_clip": Flag(),
    },
    optional=frozenset({"sent_bytes", "within_clip"}),
)
REPORT = Tagged(
    "t",
    {
        "update": RESULT,  # with the next row of payload "rows"
        "summed": RESULT,  # added to the sender's allreduce sums instead
        "failed": Record({"client": CLIENT, "reason": Text(MAX_REASON_CHARS)}),
        "end": Record({}),  # the end of one of the sender's chunks
        "busy": Record({"seconds": Number(lo=0.0)}),  # the sender's last word of a round
    },
)

KINDS: dict[str, Kind] = {
    "tasks": Kind(
        {
            "round": Int(0, MAX_INT),
            "chunks": ListOf(CHUNK, MAX_CLIENTS),
            "clip_norm": Maybe(Number(lo=0.0)),  # DP's clip norm this round (null: no DP)
        },
        ("corrections", "step_corrections"),
        "rank 0 -> worker: the worker's chunks of a round, in cohort order, the round's DP "
        "clip norm, and the per-client vectors the strategy keeps on the server, one [n, P] "
        "block each",
    ),
    "updates": Kind(
        {"round": Int(0, MAX_INT), "items": ListOf(REPORT, 4 * MAX_CLIENTS)},
        ("rows",),
        "worker -> rank 0: reports in the order made, and one [rows, P] block of updates",
    ),
    "eval_terms": Kind(
        {"batches": Int(0, MAX_INT)},
        ("terms",),
        "worker -> rank 0: per-batch evaluation terms of its share of the test batches",
    ),
    "silo_totals": Kind(
        {"silo": Int(0, MAX_CLIENTS)},
        ("totals",),
        "worker -> rank 0, data.silos: the evaluation totals on the silo it serves",
    ),
}
PAYLOAD = Record(
    {"dtype": Choice(tuple(DTYPES)), "shape": ListOf(Int(0, MAX_INT), MAX_DIMS)},
)
# rank 0 -> every worker: int64 [VERSION, code, value]; code is the index here.
ANNOUNCEMENTS = ("stop", "round", "evaluate", "evaluate_silos")


@dataclass
class Message:
    """A received header, checked against its kind's schema; ``payloads`` are the
    announced (dtype name, shape) pairs, not yet received."""

    src: int
    kind: str
    fields: dict[str, Any]
    payloads: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)


def encode(kind: str, fields: Mapping[str, Any], payloads: Sequence[torch.Tensor] = ()) -> bytes:
    """The header of a ``kind`` message with ``fields`` announcing ``payloads``; checked
    against the schema first, so a bug here fails on the sender, not on the receiver."""
    spec = KINDS[kind]
    if len(payloads) != len(spec.payloads):
        raise ValueError(f"a {kind} message carries {len(spec.payloads)} payload(s)")
    header = {
        "v": VERSION,
        "kind": kind,
        **fields,
        "payload": [{"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for t in payloads],
    }
    try:
        _check_fields(kind, {k: v for k, v in header.items() if k not in ("v", "kind")})
    except Invalid as exc:
        raise ValueError(f"cannot send this {kind} message: {exc}") from None
    return json.dumps(header, separators=(",", ":"), allow_nan=True).encode()


def decode(data: bytes, src: int, expect: Collection[str]) -> Message:
    """The header ``data`` rank ``src`` sent, checked: JSON, this VERSION, one of the
    ``expect``-ed kinds, exactly its schema's fields. Raises :class:`MessageError`."""
    wanted = " or ".join(expect)
    try:
        header = json.loads(data.decode("utf-8"), parse_constant=_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageError(
            src, f"a message that is not a fedtorch header (expected {wanted}): {show(data)}"
        ) from None
    if type(header) is not dict:
        raise MessageError(src, f"a header that is not an object (expected {wanted}): {show(data)}")
    version = header.get("v")
    if version != VERSION or type(version) is not int:
        raise MessageError(
            src, f"a message of version {show(version)}; this rank speaks version {VERSION}"
        )
    kind = header.get("kind")
    if kind not in expect or kind not in KINDS:
        raise MessageError(src, f"a message of kind {show(kind)} where {wanted} was expected")
    body = {k: v for k, v in header.items() if k not in ("v", "kind")}
    try:
        checked = _check_fields(kind, body)
    except Invalid as exc:
        raise MessageError(src, f"a malformed {kind} message: {exc}") from None
    payloads = [(p["dtype"], tuple(p["shape"])) for p in checked.pop("payload")]
    return Message(src, kind, checked, payloads)


def _constant(name: str) -> float:
    """JSON's NaN and infinities (metrics of a diverged client may hold them)."""
    return float(name)


def _check_fields(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    spec = KINDS[kind]
    record = Record({**spec.fields, "payload": ListOf(PAYLOAD, len(spec.payloads))})
    checked = record.check(dict(body), kind)
    if len(checked["payload"]) != len(spec.payloads):
        raise Invalid(f"{kind}.payload must list {len(spec.payloads)} payload(s)")
    return checked


# Sending and receiving ---------------------------------------------------------------

Pending = list[tuple[Any, torch.Tensor]]


def send(
    kind: str, fields: Mapping[str, Any], payloads: Sequence[torch.Tensor], dst: int
) -> Pending:
    """Start sending a ``kind`` message to rank ``dst`` without blocking; returns (work,
    tensor) pairs: wait on each work, and keep its tensor alive until then."""
    header = torch.frombuffer(bytearray(encode(kind, fields, payloads)), dtype=torch.uint8)
    length = torch.tensor([header.numel()], dtype=torch.int64)
    pending = [(dist.isend(length, dst), length), (dist.isend(header, dst), header)]
    for tensor in payloads:
        if tensor.numel():
            tensor = tensor.contiguous()
            pending.append((dist.isend(tensor, dst), tensor))
    return pending


def receive(src: int, expect: Collection[str], max_bytes: int) -> Message:
    """The next header rank ``src`` sent, checked (:func:`decode`); its announced length
    must be at most ``max_bytes`` (and :data:`MAX_HEADER_BYTES`) before it is read."""
    length = torch.empty(1, dtype=torch.int64)
    dist.recv(length, src)
    size = check_length(int(length.item()), max_bytes, src, expect)
    data = torch.empty(size, dtype=torch.uint8)
    dist.recv(data, src)
    return decode(data.numpy().tobytes(), src, expect)


def check_length(size: int, max_bytes: int, src: int, expect: Collection[str]) -> int:
    """``size``, a header length rank ``src`` announced, if it is positive and at most
    ``max_bytes`` (and :data:`MAX_HEADER_BYTES`), else :class:`MessageError`."""
    cap = min(int(max_bytes), MAX_HEADER_BYTES)
    if not 0 < size <= cap:
        raise MessageError(
            src,
            f"a header of {size} bytes where at most {cap} fit what it was asked for "
            f"(expected {' or '.join(expect)})",
        )
    return size


def check_payload(
    message: Message, index: int, dtype: torch.dtype | Collection[torch.dtype], shape: Sequence[int]
) -> torch.dtype:
    """The dtype of payload ``index`` of ``message`` if it is one of ``dtype`` and its
    shape is ``shape`` (what this rank assigned), else :class:`MessageError`."""
    name, announced = message.payloads[index]
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    wanted = tuple(int(s) for s in shape)
    what = KINDS[message.kind].payloads[index]
    if DTYPES[name] not in allowed or announced != wanted:
        raise MessageError(
            message.src,
            f"a {message.kind} message whose {what} are {name} {list(announced)}; expected "
            f"{' or '.join(DTYPE_NAMES[d] for d in allowed)} {list(wanted)}",
        )
    return DTYPES[name]


def receive_payload(
    message: Message,
    index: int,
    dtype: torch.dtype | Collection[torch.dtype],
    shape: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Payload ``index`` of ``message``, once its announced dtype and shape are checked
    (:func:`check_payload`); received into ``out`` when given (same dtype and shape)."""
    got = check_payload(message, index, dtype, shape)
    if out is None:
        out = torch.empty(tuple(shape), dtype=got)
    if out.numel():
        dist.recv(out, message.src)
    return out


def announce(name: str, value: int) -> None:
    """Rank 0: tell every worker what comes next (a collective every rank joins)."""
    code = torch.tensor([VERSION, ANNOUNCEMENTS.index(name), int(value)], dtype=torch.int64)
    dist.broadcast(code, 0)


def hear(limits: Mapping[str, int]) -> tuple[str, int]:
    """A worker: rank 0's next announcement, (name, value), with the value at most
    ``limits[name]`` (a round index, a number of test batches)."""
    code = torch.zeros(3, dtype=torch.int64)
    dist.broadcast(code, 0)
    version, index, value = (int(v) for v in code.tolist())
    if version != VERSION:
        raise MessageError(
            0, f"an announcement of version {version}; this rank speaks version {VERSION}"
        )
    if not 0 <= index < len(ANNOUNCEMENTS):
        raise MessageError(0, f"an announcement of unknown kind {index}")
    name = ANNOUNCEMENTS[index]
    if not 0 <= value <= limits.get(name, MAX_INT):
        raise MessageError(0, f"a {name} announcement with value {value} out of range")
    return name, value


def printable(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as :class:`Text` accepts it: printable ASCII, at most ``limit`` chars."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in " ".join(str(text).split()))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


__all__ = [
    "ANNOUNCEMENTS",
    "DTYPES",
    "KINDS",
    "METRIC_NAMES",
    "VERSION",
    "Kind",
    "Message",
    "MessageError",
    "announce",
    "check_length",
    "check_payload",
    "decode",
    "encode",
    "hear",
    "printable",
    "receive",
    "receive_payload",
    "send",
]
