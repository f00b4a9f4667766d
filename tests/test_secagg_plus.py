"""SecAgg+ (fedtorch.privacy.secagg_plus): correctness of the unmasked sum, drop-out
recovery, aborts that reveal nothing, uniform masked vectors, the cryptographic code paths
(RFC 7748 vector, AES-GCM with a wrong key, fresh secrets), Shamir sharing, the degree
rule, and the byte format."""

from __future__ import annotations

import math
import os
import random
import secrets

import pytest
import torch

from fedtorch.errors import ConfigError, FedtorchError
from fedtorch.privacy import secagg_shamir as shamir
from fedtorch.privacy.secagg_crypto import Ring, open_sealed, seal
from fedtorch.privacy.secagg_graph import (
    TARGET_FAILURE,
    choose_degree,
    failure_bound,
    harary_graph,
    hypergeometric_tail,
    threshold_for,
)
from fedtorch.privacy.secagg_messages import HEADER, SEALED_BYTES
from fedtorch.privacy.secagg_plus import (
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    SecAggAbort,
    SecAggClient,
    SecAggPlusConfig,
    SecAggProtocolError,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    agree,
    decode,
    decode_fixed_point,
    encode_fixed_point,
    plain_ring_sum,
    run_round,
)

SIZE = 300  # not a multiple of the block: the last block is short
BLOCK = 64  # several blocks per vector


def ring_inputs(num_clients: int, bits: int, size: int = SIZE, seed: int = 0) -> list[torch.Tensor]:
    """Random ring elements, with the extremes 0 and 2^bits - 1 in every vector."""
    rng = random.Random(seed)
    top = (1 << bits) - 1
    out = []
    for _ in range(num_clients):
        values = [rng.randint(0, top) for _ in range(size)]
        values[0], values[1] = 0, top
        # bits = 64: store the two's-complement int64 of each value
        out.append(torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values]))
    return out


def config(bits: int = 32, **kwargs) -> SecAggPlusConfig:
    return SecAggPlusConfig(bits=bits, block=BLOCK, **kwargs)


def start(num_clients: int, cfg: SecAggPlusConfig, size: int = SIZE, round_idx: int = 0):
    """A server and clients 0..K-1 of one round."""
    server = SecAggServer(round_idx, size, cfg)
    clients = {c: SecAggClient(c, round_idx, size, cfg.bits, cfg.block) for c in range(num_clients)}
    return server, clients


def to_masking(server: SecAggServer, clients: dict, skip_shares=()) -> dict:
    """Stages 1 and 2 (objects passed directly); the forwarded shares."""
    for c in clients:
        server.receive_keys(clients[c].advertise_keys())
    directories = server.close_keys()
    for c, directory in directories.items():
        if c not in skip_shares:
            server.receive_shares(clients[c].share_keys(directory))
    return server.close_shares()


# The unmasked sum ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_clients", "graph", "bits"),
    [
        (3, {"complete_graph": True}, 16),
        (3, {"complete_graph": True}, 64),
        (7, {"degree": 4}, 32),
        (7, {"complete_graph": True}, 16),
        (7, {}, 64),
        (20, {"degree": 6}, 16),
        (20, {}, 32),
        (20, {"complete_graph": True}, 64),
        (7, {"degree": 2}, 24),  # an odd wire width (3 bytes an element)
    ],
)
def test_sum_equals_plain_sum(num_clients: int, graph: dict, bits: int) -> None:
    inputs = ring_inputs(num_clients, bits, seed=num_clients + bits)
    report = run_round(inputs, config(bits, **graph))
    assert torch.equal(report.total, plain_ring_sum(inputs, bits))
    assert report.survivors == tuple(range(num_clients))
    if graph.get("complete_graph"):
        assert report.degree == num_clients - 1
    wire = (bits + 7) // 8
    assert report.stages["advertise"].bytes_up == num_clients * (HEADER.size + 4 + 64)
    masked_bytes = HEADER.size + MaskedInput.META.size + SIZE * wire
    assert report.stages["mask"].bytes_up == num_clients * masked_bytes
    assert all(cost.bytes_up > 0 for cost in report.stages.values())


def test_default_graph_is_sparse_for_many_clients() -> None:
    inputs = ring_inputs(40, 16, size=32)
    report = run_round(inputs, config(16, dropout_rate=0.05, corruption_rate=0.05))
    assert report.degree < 39
    assert report.degree == choose_degree(40, 0.05, 0.05).degree
    assert torch.equal(report.total, plain_ring_sum(inputs, 16))


# Drop-outs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drop",
    [
        {1: {0}},
        {2: {3, 11}},
        {3: {1, 7}},
        {4: {2, 9}},
        {2: {4}, 3: {6, 13}, 4: {8}},
    ],
)
@pytest.mark.parametrize("graph", [{"degree": 8}, {"complete_graph": True}])
def test_dropouts_are_recovered(drop: dict, graph: dict) -> None:
    inputs = ring_inputs(20, 32)
    report = run_round(inputs, config(32, **graph), drop=drop)
    gone = set().union(*(ids for stage, ids in drop.items() if stage <= 3))
    assert report.survivors == tuple(c for c in range(20) if c not in gone)
    assert torch.equal(report.total, plain_ring_sum([inputs[c] for c in report.survivors], 32))


def test_stage3_dropout_in_small_complete_graph() -> None:
    inputs = ring_inputs(7, 16)
    report = run_round(inputs, config(16, complete_graph=True), drop={3: {0, 6}})
    assert torch.equal(report.total, plain_ring_sum(inputs[1:6], 16))


# Aborts reveal nothing -------------------------------------------------------------------


def assert_aborted(server: SecAggServer, exc: pytest.ExceptionInfo) -> None:
    assert isinstance(exc.value, FedtorchError)
    assert "\n" not in str(exc.value)
    assert server.total is None and not server.holds_sum and server.aborted
    with pytest.raises(SecAggAbort):
        server.finish()


def test_too_few_masked_inputs_aborts() -> None:
    cfg = config(16, complete_graph=True)  # K = 7: k = 6, t = 3
    server, clients = start(7, cfg)
    forwarded = to_masking(server, clients)
    inputs = ring_inputs(7, 16)
    for c in (0, 1):
        server.receive_masked_input(clients[c].masked_input(forwarded[c], inputs[c]))
    assert server.holds_sum
    with pytest.raises(SecAggAbort, match="2 clients sent masked inputs, threshold 3") as exc:
        server.close_inputs()
    assert_aborted(server, exc)


def test_too_few_unmask_responses_aborts() -> None:
    cfg = config(16, complete_graph=True)
    server, clients = start(7, cfg)
    forwarded = to_masking(server, clients)
    inputs = ring_inputs(7, 16)
    for c in clients:
        server.receive_masked_input(clients[c].masked_input(forwarded[c], inputs[c]))
    requests = server.close_inputs()
    for c in (0, 1):
        server.receive_unmask(clients[c].unmask(requests[c]))
    with pytest.raises(SecAggAbort, match="answered the unmask request") as exc:
        server.finish()
    assert_aborted(server, exc)


def test_too_few_holders_of_a_secret_aborts_before_any_reveal() -> None:
    # Ring of 7 (k = 2, t = 2): client 0's neighbours drop at stage 3, so nobody left
    # holds its shares; the server must stop before asking anyone for shares.
    cfg = config(16, degree=2)
    server, clients = start(7, cfg)
    forwarded = to_masking(server, clients)
    gone = set(server.graph[0])
    inputs = ring_inputs(7, 16)
    for c in clients:
        if c not in gone:
            server.receive_masked_input(clients[c].masked_input(forwarded[c], inputs[c]))
    with pytest.raises(SecAggAbort, match="held by [01] survivors, threshold 2") as exc:
        server.close_inputs()
    assert server.requests == {}
    assert_aborted(server, exc)


def test_tampered_key_share_is_detected_and_leaves_no_sum() -> None:
    cfg = config(16, complete_graph=True)  # K = 7: t = 3; client 6 drops after sharing
    server, clients = start(7, cfg)
    forwarded = to_masking(server, clients)
    inputs = ring_inputs(7, 16)
    for c in range(6):
        server.receive_masked_input(clients[c].masked_input(forwarded[c], inputs[c]))
    requests = server.close_inputs()
    assert requests[0].dropped == (6,)
    for c in range(6):
        response = clients[c].unmask(requests[c])
        if c == 0:  # the smallest evaluation point: used by every reconstruction
            (owner, value), *_ = response.key_shares
            response = UnmaskResponse(0, 0, response.seed_shares, ((owner, value ^ 1),))
        server.receive_unmask(response)
    with pytest.raises(SecAggProtocolError, match="client 6|inconsistent"):
        server.finish()
    assert server.total is None and not server.holds_sum and server.aborted


def test_run_round_raises_one_abort() -> None:
    with pytest.raises(SecAggAbort):
        run_round(ring_inputs(7, 16), config(16, complete_graph=True), drop={3: {0, 1, 2, 3, 4}})


# Masked vectors look uniform -------------------------------------------------------------


def masked_vector(value: int, size: int, bits: int = 16) -> torch.Tensor:
    """Client 0's masked vector for an input of ``value`` everywhere (K = 3)."""
    cfg = SecAggPlusConfig(bits=bits, complete_graph=True)
    server, clients = start(3, cfg, size=size)
    forwarded = to_masking(server, clients)
    msg = clients[0].masked_input(forwarded[0], torch.full((size,), value, dtype=torch.int64))
    ring = Ring(bits)
    return ring.to_tensor(ring.unpack(MaskedInput.from_bytes(msg.to_bytes()).payload, 0, size))


def chi_square_is_uniform(values: torch.Tensor, bins: int) -> bool:
    """Chi-square test of uniformity over ``bins`` equal cells, at about 6 sigma."""
    counts = torch.bincount(values, minlength=bins).double()
    expected = values.numel() / bins
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = bins - 1
    return abs(stat - df) < 6 * math.sqrt(2 * df)


@pytest.mark.parametrize("value", [0, 2**16 - 1])
def test_masked_vector_is_uniform(value: int) -> None:
    size = 1 << 19  # 8 expected per value of the ring
    masked = masked_vector(value, size)
    assert chi_square_is_uniform(masked, 1 << 16)
    assert chi_square_is_uniform(masked >> 8, 256)  # high byte
    assert chi_square_is_uniform(masked & 255, 256)  # low byte
    assert not torch.equal(masked, torch.full_like(masked, value))


# Cryptographic code paths ----------------------------------------------------------------


def test_rfc7748_x25519_vector_through_agree() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert agree(alice, bob_pub) == shared
    assert agree(bob, alice_pub) == shared


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(SecAggProtocolError, match="X25519"):
        agree(os.urandom(32), bytes(32))


def test_wrong_key_fails_to_decrypt() -> None:
    key, aad = os.urandom(32), b"context"
    sealed = seal(key, b"share", aad)
    assert open_sealed(key, sealed, aad) == b"share"
    with pytest.raises(SecAggProtocolError, match="AES-GCM"):
        open_sealed(os.urandom(32), sealed, aad)
    with pytest.raises(SecAggProtocolError, match="AES-GCM"):
        open_sealed(key, sealed, b"other context")


def test_share_forwarded_to_the_wrong_client_fails() -> None:
    server, clients = start(4, config(16, complete_graph=True))
    forwarded = to_masking(server, clients)
    # Client 1 receives the share client 3 sealed to client 0, relabelled as its own.
    stolen = dict(forwarded[0].sealed)[3]
    items = tuple((s, stolen if s == 3 else b) for s, b in forwarded[1].sealed)
    with pytest.raises(SecAggProtocolError, match="client 1: share from client 3.*AES-GCM"):
        clients[1].masked_input(ForwardedShares(0, 1, items), torch.zeros(SIZE, dtype=torch.int64))


def test_secrets_and_masks_differ_between_runs() -> None:
    inputs = ring_inputs(3, 16)
    runs = []
    for _ in range(2):
        server, clients = start(3, config(16, complete_graph=True))
        forwarded = to_masking(server, clients)
        masked = clients[0].masked_input(forwarded[0], inputs[0])
        runs.append((clients[0].mask_public, clients[0].share_public, bytes(masked.payload)))
    assert all(a != b for a, b in zip(*runs))  # both keys and the masked vector
    sums = [run_round(inputs, config(16, complete_graph=True)).total for _ in range(2)]
    assert torch.equal(sums[0], sums[1])


def test_client_answers_one_unmask_request_never_both_secrets() -> None:
    server, clients = start(4, config(16, complete_graph=True))
    forwarded = to_masking(server, clients)
    client = clients[0]
    client.masked_input(forwarded[0], torch.zeros(SIZE, dtype=torch.int64))
    with pytest.raises(SecAggProtocolError, match="both secrets"):
        client.unmask(UnmaskRequest(0, 0, (1, 2), (2,)))
    with pytest.raises(SecAggProtocolError, match="stage 4 requested after stage 4"):
        client.unmask(UnmaskRequest(0, 0, (1,), (2,)))


# Shamir ----------------------------------------------------------------------------------


def test_shamir_any_t_shares_reconstruct() -> None:
    secret = secrets.token_bytes(32)
    points, t = list(range(1, 11)), 4
    shares = shamir.split(secret, points, t)
    rng = random.Random(1)
    for _ in range(10):
        subset = rng.sample(points, rng.randint(t, len(points)))
        assert shamir.combine({x: shares[x] for x in subset}, t) == secret


def test_shamir_t_minus_one_shares_fail() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, range(1, 11), 4)
    three = {x: shares[x] for x in (2, 5, 9)}
    with pytest.raises(SecAggAbort, match="3 shares of a secret, 4 needed"):
        shamir.combine(three, 4)
    try:
        wrong = shamir.combine(three, 3)  # interpolating too low a degree
    except SecAggProtocolError:
        wrong = None
    assert wrong != secret


def test_shamir_share_encoding_round_trip() -> None:
    value = shamir.PRIME - 1
    assert shamir.decode_share(shamir.encode_share(value)) == value
    with pytest.raises(SecAggProtocolError):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)


# The degree rule and the graph -----------------------------------------------------------


@pytest.mark.parametrize(
    ("num_clients", "dropout", "corruption"),
    [(50, 0.1, 0.0), (200, 0.05, 0.05), (1000, 0.1, 0.1), (1000, 0.3, 0.2), (10, 0.1, 0.1)],
)
def test_degree_rule_meets_its_bound(num_clients: int, dropout: float, corruption: float) -> None:
    choice = choose_degree(num_clients, dropout, corruption)
    assert choice.bound <= TARGET_FAILURE
    assert choice.bound == failure_bound(
        num_clients, choice.degree, choice.threshold, dropout, corruption
    )
    if choice.degree < num_clients - 1 and choice.degree > 2:  # the smallest even degree
        smaller = choice.degree - 2
        t = threshold_for(smaller, 0.5)
        assert failure_bound(num_clients, smaller, t, dropout, corruption) > TARGET_FAILURE


def test_degree_rule_falls_back_to_complete_and_refuses_the_impossible() -> None:
    assert choose_degree(10, 0.3, 0.2).degree == 9
    with pytest.raises(ConfigError, match="secure_aggregation.dropout_rate"):
        choose_degree(10, 0.6, 0.0)


def test_hypergeometric_tail_is_exact() -> None:
    population, marked, draws = 30, 7, 9
    exact = sum(
        math.comb(marked, x) * math.comb(population - marked, draws - x)
        for x in range(4, draws + 1)
    ) / math.comb(population, draws)
    assert hypergeometric_tail(population, marked, draws, 4) == pytest.approx(exact, rel=1e-9)


def test_harary_graph_is_regular_symmetric_and_random() -> None:
    ids = list(range(5, 35))
    graph = harary_graph(ids, 6)
    assert sorted(graph) == ids
    assert all(len(n) == 6 and c not in n for c, n in graph.items())
    assert all(c in graph[j] for c, n in graph.items() for j in n)
    assert graph != harary_graph(ids, 6)  # a fresh permutation (30! placements)
    with pytest.raises(FedtorchError, match="even"):
        harary_graph(ids, 5)


def test_disconnection_event_is_rare_empirically() -> None:
    """With the chosen degree, removing a random (gamma + delta) n clients leaves every
    sampled graph connected with every client holding enough surviving neighbours."""
    n, dropout, corruption = 60, 0.1, 0.1
    choice = choose_degree(n, dropout, corruption)
    rng = random.Random(0)
    removed_count = int(n * (dropout + corruption))
    for _ in range(50):
        graph = harary_graph(range(n), choice.degree)
        removed = set(rng.sample(range(n), removed_count))
        alive = [c for c in range(n) if c not in removed]
        seen, todo = {alive[0]}, [alive[0]]
        while todo:
            for j in graph[todo.pop()]:
                if j not in removed and j not in seen:
                    seen.add(j)
                    todo.append(j)
        assert len(seen) == len(alive)
        dropped = set(rng.sample(range(n), int(n * dropout)))
        assert all(len(set(graph[c]) - dropped) >= choice.threshold for c in range(n))


# Messages --------------------------------------------------------------------------------


def test_messages_round_trip_through_bytes() -> None:
    cfg = config(16, degree=2)
    server, clients = start(5, cfg)
    adverts = {c: clients[c].advertise_keys() for c in clients}
    assert decode(adverts[0].to_bytes()) == adverts[0]
    for advert in adverts.values():
        server.receive_keys(AdvertiseKeys.from_bytes(advert.to_bytes()))
    directories = server.close_keys()
    assert KeyDirectory.from_bytes(directories[0].to_bytes()) == directories[0]
    shared = {c: clients[c].share_keys(directories[c]) for c in clients}
    assert ShareKeys.from_bytes(shared[0].to_bytes()) == shared[0]
    assert len(shared[0].sealed[0][1]) == SEALED_BYTES
    for msg in shared.values():
        server.receive_shares(msg)
    forwarded = server.close_shares()
    assert decode(forwarded[0].to_bytes()) == forwarded[0]
    masked = clients[0].masked_input(forwarded[0], torch.zeros(SIZE, dtype=torch.int64))
    parsed = MaskedInput.from_bytes(masked.to_bytes())
    assert bytes(parsed.payload) == bytes(masked.payload)
    assert len(masked.to_bytes()) == HEADER.size + MaskedInput.META.size + 2 * SIZE
    response = UnmaskResponse(0, 0, ((1, 5), (4, 6)), ((2, shamir.PRIME - 1),))
    assert UnmaskResponse.from_bytes(response.to_bytes()) == response


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b[:5] + bytes([42]) + b[6:], "kind"),
    ],
)
def test_malformed_messages_are_refused(mutate, match: str) -> None:
    data = SecAggClient(0, 0, SIZE, 16).advertise_keys().to_bytes()
    with pytest.raises(SecAggProtocolError, match=match):
        decode(mutate(data))


def test_server_validates_senders_rounds_and_shapes() -> None:
    cfg = config(16, complete_graph=True)
    server, clients = start(4, cfg)
    msg = clients[0].advertise_keys()
    server.receive_keys(msg)
    with pytest.raises(SecAggProtocolError, match="repeated"):
        server.receive_keys(msg)
    other_round = SecAggClient(1, 5, SIZE, 16).advertise_keys()
    with pytest.raises(SecAggProtocolError, match="round 5"):
        server.receive_keys(other_round)
    copy = AdvertiseKeys(0, 9, msg.mask_key, msg.share_key)
    with pytest.raises(SecAggProtocolError, match="reuses a public key"):
        server.receive_keys(copy)
    for c in (1, 2, 3):
        server.receive_keys(clients[c].advertise_keys())
    directories = server.close_keys()
    for c in clients:
        server.receive_shares(clients[c].share_keys(directories[c]))
    forwarded = server.close_shares()
    with pytest.raises(SecAggProtocolError, match="expected 300 of 16"):
        server.receive_masked_input(MaskedInput(0, 0, 16, 10, bytes(20)))
    masked = clients[0].masked_input(forwarded[0], torch.zeros(SIZE, dtype=torch.int64))
    with pytest.raises(SecAggProtocolError, match="stage 3 requested after stage 3"):
        clients[0].masked_input(forwarded[0], torch.zeros(SIZE, dtype=torch.int64))
    server.receive_masked_input(masked)
    with pytest.raises(SecAggProtocolError, match="unexpected or repeated"):
        server.receive_masked_input(masked)


def test_inputs_outside_the_ring_are_refused() -> None:
    server, clients = start(3, config(16, complete_graph=True))
    forwarded = to_masking(server, clients)
    with pytest.raises(FedtorchError, match=r"\[0, 2\^16\)"):
        clients[0].masked_input(forwarded[0], torch.full((SIZE,), 1 << 16, dtype=torch.int64))


# Fixed point -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_fixed_point_round_trip_through_the_protocol(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    floats = [torch.randn(SIZE, generator=gen) * 0.3 for _ in range(5)]
    floats[0][0] = 5.0  # clipped to the range, and counted
    encoded = [encode_fixed_point(x, bits, 1.0, 5, block=BLOCK) for x in floats]
    assert encoded[0][1] == int((floats[0].abs() > 1).sum()) >= 1
    report = run_round([e for e, _ in encoded], config(bits, complete_graph=True))
    total = decode_fixed_point(report.total, bits, 1.0, 5, block=BLOCK)
    expected = torch.stack([x.clamp(-1, 1) for x in floats]).double().sum(0)
    assert torch.allclose(total, expected, atol=1e-6)
