"""Compression: each compressor against a hand computation, error feedback's residual,
exact byte counts, composition with privacy, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtorch.compression import Compression
from fedtorch.compression.bits import pack_bits, packed_bytes, unpack_bits
from fedtorch.compression.compressors import (
    QSGD,
    HalfPrecision,
    Int8Blocks,
    PowerSGD,
    RandK,
    ScaledSign,
    TopK,
)
from fedtorch.errors import ConfigError
from fedtorch.pipeline.pipeline import RejectedUpdate
from fedtorch.results import ClientResult
from fedtorch.server import checkpoint
from fedtorch.state.layout import KeySpec, StateLayout
from fedtorch.train import train
from tests.conftest import FAST, compose_config

EF_ON = "compression.error_feedback=true"


def spec(name: str, shape: tuple[int, ...], offset: int) -> KeySpec:
    numel = math.prod(shape)
    return KeySpec(name, torch.Size(shape), torch.float32, offset, numel)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def client(cid: int) -> ClientResult:
    return ClientResult(client_id=cid, num_samples=1, metrics={})


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 13])
def test_bits_round_trip_and_size(width):
    codes = torch.randint(0, 2**width, (37,), generator=gen(width))
    packed = pack_bits(codes, width)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_bytes(37, width) == math.ceil(37 * width / 8)
    assert torch.equal(unpack_bits(packed, width, 37), codes)


def test_topk_keeps_the_k_largest_magnitudes():
    x = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2, 4.0])
    message = TopK(0.5).encode(x)
    # k = 3: |-3|, |2|, |4|; a 6-bit mask (1 byte) is smaller than three int32 indices.
    assert torch.equal(TopK(0.5).decode(message), torch.tensor([0, -3.0, 2.0, 0, 0, 4.0]))
    assert set(message.parts) == {"values", "mask"}
    assert message.nbytes == 3 * 4 + 1


def test_topk_sends_indices_when_they_are_smaller():
    x = torch.arange(1000.0) * torch.tensor([1.0, -1.0]).repeat(500)
    message = TopK(0.01).encode(x)
    assert message.parts["indices"].dtype == torch.int32
    assert message.parts["indices"].tolist() == list(range(990, 1000))
    assert message.nbytes == 10 * 4 + 10 * 4  # values + indices < 125-byte mask
    decoded = TopK(0.01).decode(message)
    assert torch.equal(decoded[990:], x[990:]) and not decoded[:990].any()


def test_randk_draws_k_distinct_coordinates_from_its_generator():
    x = torch.randn(200, generator=gen(0))
    a = RandK(0.1).decode(RandK(0.1).encode(x, gen(5)))
    b = RandK(0.1).decode(RandK(0.1).encode(x, gen(5)))
    assert torch.equal(a, b)
    kept = a != 0
    assert int(kept.sum()) == 20 and torch.equal(a[kept], x[kept])
    c = RandK(0.1).decode(RandK(0.1).encode(x, gen(6)))
    assert not torch.equal(a, c)


def test_randk_unbiased_scales_by_p_over_k():
    x = torch.randn(50, generator=gen(1))
    compressor = RandK(0.2, unbiased=True)
    one = compressor(x, gen(0))
    kept = one != 0
    assert torch.allclose(one[kept], x[kept] * 5.0)
    mean = torch.stack([compressor(x, gen(s)) for s in range(4000)]).mean(0)
    assert torch.allclose(mean, x, atol=0.25 * x.abs().max())


def test_qsgd_levels_by_hand():
    # v = [3, 4]: ||v|| = 5; with s = 5 the scaled magnitudes 3 and 4 are whole levels, so
    # the rounding has nothing to draw and Q(v) = v exactly; codes 5+3, 5+4 in 4 bits.
    q = QSGD(levels=5, bucket=2)
    message = q.encode(torch.tensor([3.0, -4.0]), gen(0))
    assert q.width == 4
    assert message.parts["norms"].tolist() == [5.0]
    assert unpack_bits(message.parts["levels"], 4, 2).tolist() == [8, 1]
    assert torch.equal(q.decode(message), torch.tensor([3.0, -4.0]))
    assert message.nbytes == 4 + 1


def test_qsgd_is_unbiased_and_within_its_variance_bound():
    d, s = 64, 2
    v = torch.randn(d, generator=gen(3))
    q = QSGD(levels=s, bucket=d)
    draws = torch.stack([q(v, gen(seed)) for seed in range(6000)])
    assert torch.allclose(draws.mean(0), v, atol=0.1 * v.norm() / math.sqrt(d) * 3)
    variance = ((draws - v) ** 2).sum(1).mean()
    bound = min(d / s**2, math.sqrt(d) / s) * v.norm() ** 2
    assert variance <= bound
    # Each coordinate lands on one of the two levels around it.
    levels = draws / v.norm() * s
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_scaled_sign_by_hand():
    segments = [spec("a", (4,), 0), spec("b", (2,), 4)]
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, -6.0])
    sign = ScaledSign(segments)
    message = sign.encode(x)
    # Key a: ||x||_1 / d = 10 / 4; key b: 6 / 2; a zero counts as +.
    assert torch.equal(sign.decode(message), torch.tensor([2.5, -2.5, 2.5, -2.5, 3.0, -3.0]))
    assert message.nbytes == 2 * 4 + 1


def test_int8_by_hand_and_error_bound():
    x = torch.tensor([0.5, -1.27, 0.0, 1.0, 0.0, 0.0])
    int8 = Int8Blocks(block=4)
    message = int8.encode(x)
    assert message.parts["q"].tolist() == [50, -127, 0, 100, 0, 0]
    assert torch.allclose(message.parts["scales"], torch.tensor([0.01, 0.0]))
    assert message.nbytes == 6 + 2 * 4
    assert torch.allclose(int8.decode(message), x)
    y = torch.randn(1000, generator=gen(2)) * torch.logspace(-3, 2, 1000)
    int8 = Int8Blocks(block=64)
    message = int8.encode(y)
    error = (int8.decode(message) - y).abs()
    half_step = (message.parts["scales"] / 2).repeat_interleave(64)[:1000]
    assert bool((error <= half_step * (1 + 1e-5) + 1e-12).all())


def test_half_precision_sizes():
    x = torch.randn(10, generator=gen(0))
    for dtype, tolerance in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
        message = HalfPrecision(dtype).encode(x)
        assert message.nbytes == 20
        assert torch.allclose(HalfPrecision(dtype).decode(message), x, rtol=tolerance)


def test_powersgd_recovers_a_low_rank_matrix_and_sends_vectors_as_they_are():
    u, v = torch.randn(6, 1, generator=gen(0)), torch.randn(1, 5, generator=gen(1))
    matrix = u @ v
    bias = torch.randn(6, generator=gen(2))
    x = torch.cat([matrix.reshape(-1), bias])
    powersgd = PowerSGD([spec("w", (6, 5), 0), spec("b", (6,), 30)], rank=1)
    message = powersgd.encode(x, gen(3))
    assert message.nbytes == (6 + 5) * 4 + 6 * 4
    assert torch.allclose(powersgd.decode(message), x, atol=1e-5)


def test_error_feedback_carries_the_residual_exactly():
    layout = StateLayout({"w": torch.zeros(4)})
    compression = Compression(kind="topk", fraction=0.25, error_feedback=True)
    compression.bind(layout, num_clients=2, run_dir=None)
    x1 = torch.tensor([1.0, -0.5, 0.25, 2.0])
    compression.start_round(1)
    sent1 = compression.step(client(0), x1.clone())
    assert sent1.tolist() == [0, 0, 0, 2.0]
    compression.commit()
    assert compression.residuals.get(0).tolist() == [1.0, -0.5, 0.25, 0.0]
    assert not compression.residuals.get(1).any()
    x2 = torch.tensor([0.5, 0.0, 0.0, 0.5])
    compression.start_round(2)
    sent2 = compression.step(client(0), x2.clone())
    assert sent2.tolist() == [1.5, 0, 0, 0]  # 1.0 carried + 0.5 new
    compression.commit()
    # Everything the client produced is either sent or still held.
    assert torch.equal(sent1 + sent2 + compression.residuals.get(0), x1 + x2)
    # A round that is not committed leaves the residual as it was.
    compression.start_round(3)
    compression.step(client(0), torch.ones(4))
    compression.start_round(3)
    assert compression.residuals.get(0).tolist() == [0, -0.5, 0.25, 0.5]


def test_fp16_overflow_rejects_the_update():
    compression = Compression(kind="fp16")
    compression.bind(StateLayout({"w": torch.zeros(2)}), 1, None)
    compression.start_round(1)
    with pytest.raises(RejectedUpdate, match="not finite"):
        compression.step(client(0), torch.tensor([1.0, 1e6]))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "topk", "fraction": 0.0}, "compression.fraction"),
        ({"kind": "topk", "fraction": float("nan")}, "compression.fraction"),
        ({"kind": "randk", "fraction": 2}, "compression.fraction"),
        ({"kind": "qsgd", "levels": 0}, "compression.levels"),
        ({"kind": "powersgd", "rank": 0}, "compression.rank"),
        ({"kind": "int8", "fraction": 0.1}, "compression.fraction"),
        ({"kind": "none", "error_feedback": True}, "compression.error_feedback"),
        ({"kind": "gzip"}, "compression.kind"),
        ({"kind": "topk", "downlink": "qsgd"}, "compression.downlink"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        Compression(**kwargs)
    assert str(info.value).startswith(key + ":")


def byte_run(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    train(compose_config([*FAST, "num_clients=4", *overrides]), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.mark.parametrize(
    "kind",
    [
        "fp16",
        "topk",
        "powersgd",
        # The same check for the other codecs runs with `make test-full` (default-suite time).
        *(
            pytest.param(k, marks=pytest.mark.slow)
            for k in ("bf16", "int8", "qsgd", "randk", "signsgd")
        ),
    ],
)
def test_reported_bytes_are_the_encoded_sizes(tmp_path, kind):
    summary, rows = byte_run(tmp_path, f"compression={kind}")
    state = checkpoint.load_state(tmp_path / "run" / "model.pt")
    layout = StateLayout(state)
    compression = Compression(kind=kind)
    compression.bind(layout, 4, None)
    # Every compressor's message size depends only on the layout, not on the values.
    one = compression.compressor.encode(torch.randn(layout.size), gen(0)).nbytes
    clients = sum(r["clients"] for r in rows)
    assert summary["bytes_up"] == one * clients
    assert summary["bytes_up_uncompressed"] == layout.size * 4 * clients
    assert rows[-1]["compression_ratio"] == pytest.approx(layout.size * 4 / one)


def test_int8_downlink_counts_its_bytes_and_clients_train_from_the_decoded_copy(tmp_path):
    summary, rows = byte_run(tmp_path, "compression=topk", "compression.downlink=int8")
    state = checkpoint.load_state(tmp_path / "run" / "model.pt")
    size = StateLayout(state).size
    per_client = size + 4 * math.ceil(size / 256)
    assert summary["bytes_down"] == per_client * sum(r["clients"] for r in rows)
    assert rows[0]["compression_ratio_down"] == pytest.approx(size * 4 / per_client)


def test_privacy_clips_the_decoded_update(tmp_path):
    """Unbiased rand-k multiplies what it keeps by P/k, far past the clip norm; the DP
    step comes after decoding, so every released update is still within the clip."""
    from fedtorch.config.build import build

    cfg = compose_config(
        [
            *FAST,
            "privacy=dp_central",
            "privacy.clip_norm=0.01",
            "compression=randk",
            "compression.fraction=0.1",
            "compression.unbiased=true",
        ]
    )
    orchestrator = build(cfg, tmp_path / "run")
    orchestrator.compression.start_round(1)
    pipeline = orchestrator._start_pipeline(orchestrator.strategy.configure([0, 1], 1), 1)
    size = orchestrator.layout.size
    private = pipeline.aggregator
    sent = []
    original = private.add
    private.add = lambda c, update: (sent.append(update.clone()), original(c, update))[1]
    pipeline.add(client(0), torch.full((size,), 0.001))
    assert len(sent) == 1 and float(sent[0].norm()) <= 0.01 * (1 + 1e-5)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_error_feedback_resume_is_bit_identical(tmp_path, storage):
    common = [
        *FAST,
        "rounds=4",
        "num_clients=6",
        "clients_per_round=3",
        "compression=qsgd",
        "compression.levels=1",
        "compression.error_feedback=true",
        f"compression.residual_storage={storage}",
        "checkpoint.every=1",
    ]
    whole = tmp_path / "whole"
    train(compose_config(common), whole)
    part = tmp_path / "part"
    train(compose_config([*common, "rounds=2"]), part)
    train(compose_config([*common, f"resume={part}", "resume_force=true"]), part)
    a = checkpoint.load_state(whole / "model.pt")
    b = checkpoint.load_state(part / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary == {
        **summary,
        **{
            k: v
            for k, v in json.loads((part / "summary.json").read_text()).items()
            if k.startswith("bytes") or k == "compression_ratio"
        },
    }


@pytest.mark.parametrize("strategy", ["median", "krum", "scaffold", "fednova"])
def test_every_strategy_aggregates_decoded_updates(tmp_path, strategy):
    extra = ["strategy.num_byzantine=1", "num_clients=5"] if strategy == "krum" else []
    summary, rows = byte_run(tmp_path, f"strategy={strategy}", *extra, "compression=signsgd", EF_ON)
    assert summary["rounds_completed"] == 3 and all(r["failed"] == 0 for r in rows)
    # SCAFFOLD's control-variate update travels uncompressed beside the signs.
    assert summary["compression_ratio"] > (1.8 if strategy == "scaffold" else 20)
