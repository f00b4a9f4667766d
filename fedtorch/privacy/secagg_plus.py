"""SecAgg+: secure aggregation with real cryptography over a sparse random graph.

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning") on the neighbour graph of Bell et al. 2020 ("Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead"), for an honest-but-curious server and clients
that may drop out at any stage. The server learns the sum mod 2^bits of the inputs of the
clients that delivered, and nothing else about any one of them.

Four stages of plain messages (:mod:`fedtorch.privacy.secagg_messages`, a fixed versioned
byte format, no pickle) between one :class:`SecAggClient` per client and a
:class:`SecAggServer`; the caller moves the messages:

1. Advertise keys. Client i draws two X25519 key pairs (c_i for share encryption, s_i for
   mask agreement) and sends both public keys (:class:`AdvertiseKeys`). The server closes
   the stage with U1, draws the neighbour graph on U1 (:mod:`fedtorch.privacy.secagg_graph`)
   and sends each client its neighbours' keys and the threshold t (:class:`KeyDirectory`).
2. Share keys. Client i draws a self-mask seed b_i and Shamir-shares b_i and the s_i
   private key t-of-k among its k neighbours (:mod:`fedtorch.privacy.secagg_shamir`, field
   GF(2^521 - 1)). Each neighbour j's pair of shares is sealed with AES-256-GCM under
   HKDF-SHA256(X25519(c_i, c_j)), associated data binding version, round, sender and
   recipient (:class:`ShareKeys`). The server closes the stage with U2 and forwards to
   each member the shares members of U2 sealed to it (:class:`ForwardedShares`).
3. Masked input. Client i opens its shares (a wrong key fails the AES-GCM tag) and sends
   y_i = x_i + PRG(b_i) + sum_{j in N(i) cap U2} sign(j - i) PRG(s_ij) mod 2^bits, where
   s_ij = HKDF(X25519(s_i, s_j)) and PRG is the AES-256-CTR keystream
   (:class:`MaskedInput`). The server adds each y_i to one running ring sum as it arrives.
   It closes the stage with U3 and asks each member j, for each neighbour whose shares j
   holds, for the share of b (neighbour in U3) or of the s private key (neighbour in
   U2 \\ U3, dropped after sharing) (:class:`UnmaskRequest`), never both.
4. Unmask. Each member of U3 answers once (:class:`UnmaskResponse`). The server
   reconstructs b_i for every i in U3 and the s private key of every dropped client a
   member of U3 masked with (checked against its advertised public key), subtracts the
   self masks, removes the dropped clients' pair masks, and returns the sum.

Pair masks between members of U3 cancel (+PRG(s_ij) from the smaller id, -PRG(s_ij) from
the larger). A client that drops at stage 2 is never masked with (its neighbours only mask
with U2); one that drops at stage 3 has its pair masks removed through its neighbours'
shares of its key; one that drops at stage 4 is a survivor whose b_i the others' shares
rebuild. Fewer than t clients at any stage, or fewer than t shares for any needed
reconstruction (checked for all of them before any secret is rebuilt), aborts the round
with :class:`SecAggAbort`: the server discards its running sum and returns nothing.

Memory: the client masks and the server adds and unmasks ``block`` ring elements at a
time (masks are expanded block by block from the keystream position), so beyond the input
and the message the client needs O(block) and the server one [P] sum, whatever K.

Randomness: every key, seed, Shamir coefficient, nonce and the graph's permutation come
from the OS CSPRNG (``os.urandom`` / :mod:`secrets`), never from the run seed, so two runs
with identical inputs use different secrets and masks (their sums agree).

Degree rule (:func:`choose_degree`): the smallest even k whose bound on the probability
that the round is insecure or cannot finish is at most 2^-40, given the rates of
drop-outs and corrupted clients (the three events of Bell et al.: the honest survivors'
graph disconnects; a client has t corrupted neighbours; a client has fewer than t
surviving neighbours), each bounded exactly for the Harary graph with a random placement
and summed over clients; the complete graph (k = K - 1, Bonawitz's protocol) when no
sparse graph meets it. Details in :mod:`fedtorch.privacy.secagg_graph`.

Fixed point (as :mod:`fedtorch.privacy.secagg`): a coordinate is clipped to [-R, R] and
mapped to round(x * scale) mod 2^bits with scale = (2^(bits-1) - 1) / (K R), so the sum of
K clipped values cannot wrap (:func:`encode_fixed_point`, :func:`decode_fixed_point`).

Not covered: a malicious server (it could lie about who dropped to get both shares of a
client from different neighbours; Bell et al.'s malicious variant adds a consistency
round and t > (k + corrupted neighbours) / 2), and drop-outs chosen after seeing the graph.

:func:`run_round` runs a whole round in one process through the byte format, with
simulated drop-outs per stage, and reports per-stage bytes and seconds for the client and
server sides.

Fitting it into a round loop (the place of :class:`fedtorch.privacy.secagg.SecureAggregation`):
``secure_aggregation.bits`` and ``threshold`` map to :class:`SecAggPlusConfig`, whose new
keys ``dropout_rate``, ``corruption_rate``, ``degree`` and ``complete_graph`` size the graph;
``value_range`` feeds :func:`encode_fixed_point` on the client and
:func:`decode_fixed_point` after :meth:`SecAggServer.finish`. Stages 1 and 2 run when the
cohort is sampled; a client's :meth:`SecAggClient.masked_input` replaces
``MaskingRound.submit`` and :meth:`SecAggServer.receive_masked_input` is the running sum; a
client that never delivers is a stage-3 drop-out, recovered as above. Keys and messages
are per round: a client object is never reused across rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fedtorch.privacy.secagg_client import (
    DEFAULT_BLOCK,
    SecAggClient,
    block_ranges,
)
from fedtorch.privacy.secagg_crypto import Ring, agree
from fedtorch.privacy.secagg_errors import (
    SecAggAbort,
    SecAggInputError,
    SecAggPlusError,
    SecAggProtocolError,
)
from fedtorch.privacy.secagg_graph import (
    TARGET_FAILURE,
    DegreeChoice,
    choose_degree,
    failure_bound,
    harary_graph,
    threshold_for,
)
from fedtorch.privacy.secagg_messages import (
    VERSION,
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    PeerKeys,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from fedtorch.privacy.secagg_server import SecAggPlusConfig, SecAggServer

__all__ = [
    "DEFAULT_BLOCK",
    "TARGET_FAILURE",
    "VERSION",
    "AdvertiseKeys",
    "DegreeChoice",
    "ForwardedShares",
    "KeyDirectory",
    "MaskedInput",
    "PeerKeys",
    "RoundReport",
    "SecAggAbort",
    "SecAggClient",
    "SecAggInputError",
    "SecAggPlusConfig",
    "SecAggPlusError",
    "SecAggProtocolError",
    "SecAggServer",
    "ShareKeys",
    "StageCost",
    "UnmaskRequest",
    "UnmaskResponse",
    "agree",
    "choose_degree",
    "decode",
    "decode_fixed_point",
    "encode_fixed_point",
    "failure_bound",
    "fixed_point_scale",
    "harary_graph",
    "plain_ring_sum",
    "run_round",
    "threshold_for",
]

STAGES = ("advertise", "share", "mask", "unmask")


# Fixed point -------------------------------------------------------------------------


def fixed_point_scale(bits: int, value_range: float, cohort_size: int) -> float:
    """Scale that keeps the sum of ``cohort_size`` values in [-R, R] from wrapping."""
    return (2 ** (bits - 1) - 1) / (cohort_size * value_range)


def encode_fixed_point(
    update: torch.Tensor,
    bits: int,
    value_range: float,
    cohort_size: int,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, int]:
    """A float [P] update as [P] int64 ring elements of Z_(2^bits), and how many
    coordinates were clipped to +-``value_range`` (counted, never silent)."""
    Ring(bits)
    scale = fixed_point_scale(bits, value_range, cohort_size)
    out = torch.empty(update.numel(), dtype=torch.int64)
    flat, clipped = update.reshape(-1), 0
    for offset, count in block_ranges(update.numel(), block):
        part = flat[offset : offset + count].detach().cpu().double()
        clipped += int((part.abs() > value_range).sum())
        ring = torch.round(part.clamp_(-value_range, value_range).mul_(scale)).to(torch.int64)
        if bits < 64:  # two's complement: x & (2^bits - 1) is x mod 2^bits, also for x < 0
            ring.bitwise_and_((1 << bits) - 1)
        out[offset : offset + count] = ring
    return out, clipped


def decode_fixed_point(
    total: torch.Tensor,
    bits: int,
    value_range: float,
    cohort_size: int,
    dtype: torch.dtype = torch.float64,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """The ring sum of :func:`encode_fixed_point` values back to floats [P]."""
    scale = fixed_point_scale(bits, value_range, cohort_size)
    out = torch.empty(total.numel(), dtype=dtype)
    for offset, count in block_ranges(total.numel(), block):
        view = total[offset : offset + count]
        if bits < 64:  # for 64 bits an int64 already is the signed value
            view = torch.where(view >= 1 << (bits - 1), view - (1 << bits), view)
        out[offset : offset + count] = view.double().div_(scale)
    return out


# In-process driver ---------------------------------------------------------------------


@dataclass
class StageCost:
    """What one stage cost, with actual serialized sizes.

    Stage s counts the server's message that opens it for each client (``bytes_down``,
    ``messages_down``; none for stage 1) and the server's work to close stage s - 1 and
    build those messages, then the clients' answers (``bytes_up``) and the server's work
    to take them in. Stage 4 also counts the server's reconstruction and unmasking.
    ``client_seconds`` is summed over the ``clients`` that answered; ``server_seconds``
    includes parsing and serializing.
    """

    bytes_up: int = 0
    bytes_down: int = 0
    messages_down: int = 0
    client_seconds: float = 0.0
    client_seconds_max: float = 0.0
    server_seconds: float = 0.0
    clients: int = 0

    def add_client(self, seconds: float, sent: int) -> None:
        self.client_seconds += seconds
        self.client_seconds_max = max(self.client_seconds_max, seconds)
        self.bytes_up += sent
        self.clients += 1


@dataclass
class RoundReport:
    """One round of :func:`run_round`: the unmasked sum and what it cost."""

    total: torch.Tensor  # [P] int64 ring sum of the inputs of the survivors (U3)
    num_clients: int
    degree: int
    threshold: int
    survivors: tuple[int, ...]  # U3, sorted
    stages: dict[str, StageCost] = field(default_factory=dict)

    def client_seconds_per_client(self) -> float:
        """Mean seconds one client spent over the whole round (sum of stage means)."""
        return sum(s.client_seconds / s.clients for s in self.stages.values() if s.clients)

    def server_seconds(self) -> float:
        """Seconds the server spent over the whole round."""
        return sum(s.server_seconds for s in self.stages.values())

    def bytes_up_per_client(self) -> float:
        """Mean bytes one client sent over the round (sum of stage means)."""
        return sum(s.bytes_up / s.clients for s in self.stages.values() if s.clients)

    def bytes_down_per_client(self) -> float:
        """Mean bytes one client received over the round (sum of stage means)."""
        return sum(s.bytes_down / s.messages_down for s in self.stages.values() if s.messages_down)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors)."""
        return {
            "num_clients": self.num_clients,
            "degree": self.degree,
            "threshold": self.threshold,
            "survivors": len(self.survivors),
            "client_seconds_per_client": self.client_seconds_per_client(),
            "server_seconds": self.server_seconds(),
            "bytes_up_per_client": self.bytes_up_per_client(),
            "bytes_down_per_client": self.bytes_down_per_client(),
            "stages": {name: vars(cost) for name, cost in self.stages.items()},
        }


M = TypeVar("M")


def _timed(function: Callable[[], M]) -> tuple[M, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def _client_step(
    cost: StageCost, parse: Callable[[bytes], Any], data: bytes, act: Callable[[Any], Any]
) -> bytes:
    """A client parses ``data``, acts on it and serializes its answer (timed)."""
    out, seconds = _timed(lambda: act(parse(data)).to_bytes())
    cost.add_client(seconds, len(out))
    return out


def _server_outbox(cost: StageCost, close: Callable[[], Mapping[int, Any]]) -> dict[int, bytes]:
    """The server closes the previous stage and serializes the messages that open the
    stage of ``cost`` (timed)."""
    out, seconds = _timed(lambda: {c: m.to_bytes() for c, m in close().items()})
    cost.server_seconds += seconds
    cost.bytes_down += sum(len(b) for b in out.values())
    cost.messages_down += len(out)
    return out


def _server_inbox(
    cost: StageCost, parse: Callable[[bytes], Any], receive: Callable[[Any], None], data: bytes
) -> None:
    """The server parses one client's message and takes it in (timed)."""
    _, seconds = _timed(lambda: receive(parse(data)))
    cost.server_seconds += seconds


def run_round(
    inputs: Sequence[torch.Tensor],
    config: SecAggPlusConfig | None = None,
    *,
    round_idx: int = 0,
    drop: Mapping[int, Collection[int]] | None = None,
    size: int | None = None,
) -> RoundReport:
    """One SecAgg+ round in this process, every message through its byte format.

    Args:
        inputs: client i's [P] int64 ring elements in [0, 2^bits) at ``inputs[i]`` (ids
            0..K-1). Any sequence: a lazy one that builds ``inputs[i]`` on demand keeps
            memory independent of K.
        config: protocol settings (bits, threshold, graph).
        round_idx: the round index bound into every message.
        drop: ``{stage: client ids}``: clients that fall silent at that stage (1-4), sending
            neither that stage's message nor any later one.
        size: P (default: ``inputs[0].numel()``).

    Returns:
        The unmasked ring sum of the survivors' inputs and per-stage costs. Client time
        excludes building the input; a client that aborts at stage 3 (too few
        neighbours' shares) counts as dropped there.

    Raises:
        SecAggAbort: the round cannot be unmasked safely (nothing is returned).
    """
    config = config or SecAggPlusConfig()
    drop = {s: set(ids) for s, ids in (drop or {}).items()}
    if not set(drop) <= set(range(1, len(STAGES) + 1)):
        raise SecAggInputError(f"drop stages must be in 1-4, got {sorted(drop)}")
    size = int(inputs[0].numel()) if size is None else size
    server = SecAggServer(round_idx, size, config)
    clients = {
        c: SecAggClient(c, round_idx, size, config.bits, config.block) for c in range(len(inputs))
    }
    stages = {name: StageCost() for name in STAGES}

    def alive(stage: int, ids: Collection[int]) -> list[int]:
        gone = set().union(*(drop.get(s, set()) for s in range(1, stage + 1)))
        return [c for c in sorted(ids) if c not in gone]

    cost = stages["advertise"]
    for c in alive(1, clients):
        data, seconds = _timed(lambda c=c: clients[c].advertise_keys().to_bytes())
        cost.add_client(seconds, len(data))
        _server_inbox(cost, AdvertiseKeys.from_bytes, server.receive_keys, data)

    cost = stages["share"]
    outbox = _server_outbox(cost, server.close_keys)
    for c in alive(2, outbox):
        data = _client_step(cost, KeyDirectory.from_bytes, outbox[c], clients[c].share_keys)
        _server_inbox(cost, ShareKeys.from_bytes, server.receive_shares, data)

    cost = stages["mask"]
    outbox = _server_outbox(cost, server.close_shares)
    for c in alive(3, outbox):
        values = inputs[c]
        try:
            data = _client_step(
                cost,
                ForwardedShares.from_bytes,
                outbox[c],
                lambda msg, c=c, values=values: clients[c].masked_input(msg, values),
            )
        except SecAggAbort:
            continue
        _server_inbox(cost, MaskedInput.from_bytes, server.receive_masked_input, data)
        del data, values

    cost = stages["unmask"]
    outbox = _server_outbox(cost, server.close_inputs)
    for c in alive(4, outbox):
        data = _client_step(cost, UnmaskRequest.from_bytes, outbox[c], clients[c].unmask)
        _server_inbox(cost, UnmaskResponse.from_bytes, server.receive_unmask, data)
    total, seconds = _timed(server.finish)
    cost.server_seconds += seconds
    return RoundReport(
        total, len(inputs), server.degree, server.threshold, tuple(sorted(server.delivered)), stages
    )


def plain_ring_sum(inputs: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
    """The sum mod 2^bits of [P] int64 ring elements, computed in the clear (the
    reference the protocol's result must equal)."""
    ring = Ring(bits)
    total = ring.from_tensor(inputs[0])
    for x in inputs[1:]:
        total += ring.from_tensor(x)  # unsigned numpy arithmetic wraps
    return ring.to_tensor(ring.reduce(total))
