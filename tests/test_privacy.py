"""Differential privacy and secure aggregation: clipping, noise scale, accounting against
Opacus, secure sums, mask independence, drop-out recovery, and whole runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.privacy import DifferentialPrivacy, calibrate_noise, clip_rows
from fedtorch.privacy.secagg import SecureAggregation
from fedtorch.privacy.secagg_plus import SecAggAbort
from tests.conftest import FAST, compose_config


def test_clipped_norms_never_exceed_the_bound():
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(50, 300, generator=gen) * torch.logspace(-3, 2, 50)[:, None]
    before = updates.clone()
    norms = clip_rows(updates, 1.5)
    assert torch.allclose(norms, before.norm(dim=1))
    assert (updates.norm(dim=1) <= 1.5 * (1 + 1e-6)).all()
    small = before.norm(dim=1) <= 1.5
    assert torch.equal(updates[small], before[small])  # short updates untouched
    # Long ones keep their direction.
    cos = torch.nn.functional.cosine_similarity(updates[~small], before[~small])
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_central_noise_scale_matches_the_formula():
    dp = DifferentialPrivacy(clip_norm=2.0, noise_multiplier=0.7)
    dp.bind(num_clients=100, clients_per_round=10, rounds=5)
    mean, metrics = dp.release(torch.zeros(200_000), 0.0, round_idx=1)
    # std of the released mean = z C / (q N) = 0.7 * 2 / 10
    assert mean.std().item() == pytest.approx(0.7 * 2.0 / 10, rel=0.01)
    assert abs(mean.mean().item()) < 1e-3
    assert metrics["clip_norm"] == 2.0


def test_local_noise_is_added_per_client():
    dp = DifferentialPrivacy(mode="local", clip_norm=1.0, noise_multiplier=0.5)
    dp.bind(num_clients=10, clients_per_round=4, rounds=3)
    reports = dp.client_side(torch.zeros(4, 100_000), [0, 1, 2, 3], round_idx=1)
    assert reports.rows.std(dim=1).tolist() == pytest.approx([0.5] * 4, rel=0.02)
    assert not torch.allclose(reports.rows[0], reports.rows[1])


def test_epsilon_matches_opacus_for_the_same_schedule():
    dp = DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    dp.bind(num_clients=1000, clients_per_round=20, rounds=50)
    reference = RDPAccountant()
    for r in range(1, 31):
        _, metrics = dp.release(torch.zeros(10), 0.0, r)
        reference.step(noise_multiplier=1.1, sample_rate=0.02)
        assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_calibrated_noise_spends_the_budget_and_stop_never_overshoots(tmp_path):
    z = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, rounds=40)
    accountant = RDPAccountant()
    for _ in range(40):
        accountant.step(noise_multiplier=z, sample_rate=0.1)
    assert 1.9 < accountant.get_epsilon(1e-5) <= 2.0 + 1e-6
    cfg = compose_config(
        [
            *FAST,
            "rounds=30",
            "num_clients=10",
            "clients_per_round=5",
            "privacy=dp_central",
            "privacy.noise_multiplier=1.0",
            "privacy.target_epsilon=8.0",
        ]
    )
    summary = build(cfg, tmp_path).run()
    assert summary["stopped_by_privacy_budget"]
    assert summary["epsilon"] <= 8.0 < summary["epsilon"] + 2.0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["epsilon"] <= 8.0 for r in rows) and len(rows) == summary["rounds_completed"] < 30


def test_adaptive_clipping_follows_the_quantile():
    dp = DifferentialPrivacy(
        clip_norm=1.0, noise_multiplier=0.5, adaptive_clipping=True, clipped_count_stddev=2.0
    )
    dp.bind(num_clients=100, clients_per_round=40, rounds=10)
    assert dp.update_noise_multiplier == pytest.approx((0.5**-2 - 4.0**-2) ** -0.5)
    dp.release(torch.zeros(3), unclipped_count=40.0, round_idx=1)  # all unclipped: C shrinks
    assert dp.clip_norm < 1.0
    shrunk = dp.clip_norm
    dp.release(torch.zeros(3), unclipped_count=0.0, round_idx=2)  # all clipped: C grows
    assert dp.clip_norm > shrunk
    with pytest.raises(ConfigError, match="^privacy.clipped_count_stddev:"):
        DifferentialPrivacy(noise_multiplier=5.0, adaptive_clipping=True).bind(100, 10, 5)


def secure_sum(agg, updates, ids, round_idx=1, failed=()):
    """The unmasked sum of a SecAgg+ round whose clients in ``failed`` never submit."""
    masking = agg.start_round(ids, round_idx, updates.shape[1])
    for c, row in zip(ids, updates):
        if c not in failed:
            masking.submit(c, row)
    return masking, masking.unmask()


def quantum(agg, cohort):
    """One fixed-point step of the ring encoding (the rounding per client is half that)."""
    return agg.value_range * len(cohort) / (2 ** (agg.bits - 1) - 1)


@pytest.mark.parametrize("graph", ["sparse", "complete"])
def test_secure_sum_equals_the_plain_sum_within_quantization(graph):
    agg = SecureAggregation(enabled=True, value_range=1.0, bits=32, graph=graph)
    gen = torch.Generator().manual_seed(1)
    updates = torch.rand(12, 5000, generator=gen) * 2 - 1
    ids = [3, 7, 11, 12, 20, 31, 32, 40, 41, 50, 60, 70]
    masking, total = secure_sum(agg, updates, ids)
    assert masking.clipped == 0 and masking.delivered == ids
    assert (total - updates.double().sum(0)).abs().max() <= len(ids) * quantum(agg, ids)


def test_clients_that_fail_or_drop_are_recovered_and_too_few_abort():
    agg = SecureAggregation(enabled=True, value_range=1.0, threshold=0.6, graph="complete")
    ids = list(range(10))  # complete graph, k = 9: threshold ceil(0.6 * 9) = 6
    updates = torch.rand(10, 1000) - 0.5
    failed = [1, 4, 5]
    _, total = secure_sum(agg, updates, ids, failed=failed)
    kept = [i for i in ids if i not in failed]
    assert (total - updates[kept].double().sum(0)).abs().max() <= 10 * quantum(agg, ids)
    with pytest.raises(SecAggAbort):
        secure_sum(agg, updates, ids, failed=[*failed, 8, 9])


def test_secrets_differ_between_runs_with_the_same_seed():
    agg = SecureAggregation(enabled=True, value_range=1.0, seed=0)
    first, second = agg.start_round([0, 1, 2, 3], 1, 10), agg.start_round([0, 1, 2, 3], 1, 10)
    keys = [m.clients[0].mask_public for m in (first, second)]
    assert keys[0] != keys[1]


def final_vector(tmp_path, name, extra):
    cfg = compose_config([*FAST, "rounds=2", *extra])
    orch = build(cfg, tmp_path / name)
    summary = orch.run()
    return orch.global_vector, summary


def test_secure_aggregation_reproduces_fedavg(tmp_path):
    plain, _ = final_vector(tmp_path, "plain", [])
    secure, _ = final_vector(
        tmp_path, "secure", ["secure_aggregation.enabled=true", "secure_aggregation.value_range=5"]
    )
    assert torch.allclose(plain, secure, atol=1e-5)


def test_secure_aggregation_with_dp_equals_dp_alone_and_survives_dropouts(tmp_path):
    dp = ["privacy=dp_central", "privacy.noise_multiplier=0.3", "privacy.clip_norm=0.5"]
    alone, s1 = final_vector(tmp_path, "dp", dp)
    secure, s2 = final_vector(tmp_path, "dpsa", [*dp, "secure_aggregation.enabled=true"])
    assert torch.allclose(alone, secure, atol=1e-5) and s1["epsilon"] == s2["epsilon"]
    _, summary = final_vector(
        tmp_path,
        "drop",
        [
            *dp,
            "num_clients=12",
            "secure_aggregation.enabled=true",
            "secure_aggregation.dropout=0.2",  # the graph is sized for up to 40% drop-outs
            "secure_aggregation.dropout_rate=0.4",
        ],
    )
    rows = [json.loads(x) for x in (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["secagg_dropped"] for r in rows) > 0 and summary["final_accuracy"] > 0


def test_poisson_sampling_and_unsupported_strategies(tmp_path):
    cfg = compose_config(
        [
            *FAST,
            "rounds=3",
            "num_clients=20",
            "clients_per_round=5",
            "privacy=dp_central",
            "privacy.sampling=poisson",
            "min_clients=0",
            "data.num_train=2000",
        ]
    )
    build(cfg, tmp_path / "p").run()
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["clients"] for r in rows}) > 1 or rows[0]["clients"] != 5
    with pytest.raises(ConfigError, match="^strategy: Scaffold cannot run with privacy"):
        build(compose_config([*FAST, "strategy=scaffold", "privacy=dp_central"]), tmp_path / "s")
    with pytest.raises(ConfigError, match="^secure_aggregation.value_range:"):
        build(compose_config([*FAST, "secure_aggregation.enabled=true"]), tmp_path / "v")
    assert math.isfinite(calibrate_noise(1.0, 1e-5, 0.05, 100))


def test_dpsgd_step_is_the_clipped_noised_mean_of_per_sample_gradients():
    from fedtorch.client.dpsgd import DPSGDTrainer
    from fedtorch.results import ClientTask
    from fedtorch.state.layout import StateLayout

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    layout = StateLayout(model.state_dict())
    x, y = torch.randn(8, 3) * 5, torch.randint(0, 2, (8,))
    lr, clip, sigma = 0.1, 0.5, 0.8
    trainer = DPSGDTrainer(
        model,
        layout,
        x,
        y,
        lambda p: torch.optim.SGD(p, lr=lr),
        steps=1,
        batch_size=8,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        seed=3,
    )
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    batches, sizes = trainer.schedule(0, torch.arange(8), 1)
    idx = batches[0][: sizes[0]]
    per_sample = []
    for i in idx:
        w = w_t["weight"].clone().requires_grad_()
        b = w_t["bias"].clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy((x[i] @ w.T + b)[None], y[i][None])
        per_sample.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, (w, b))]))
    g = torch.stack(per_sample)
    clipped = g * (clip / g.norm(dim=1)).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip + 1e-6).all() and (g.norm(dim=1) > clip).any()
    vector = layout.flatten(w_t)
    delta = torch.empty_like(vector)
    result = trainer.train(ClientTask(0), torch.arange(8), w_t, vector, 1, delta)
    noise = -delta / lr * 8 - clipped.sum(0)  # what the step added beyond the clipped sum
    assert noise.abs().max() > 0.01  # noise is there ...
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.8)  # ... at its scale (6 draws)
    # epsilon as Opacus computes it for one step at rate B / n = 1
    reference = RDPAccountant()
    reference.step(noise_multiplier=sigma, sample_rate=1.0)
    assert result.metrics["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


def test_dpsgd_refuses_batchnorm_and_vectorized(tmp_path):
    cfg = compose_config([*FAST, "client=dpsgd", "model._target_=tests.test_training.BNNet"])
    with pytest.raises(ConfigError, match="^client: client=dpsgd cannot train.*GroupNorm"):
        build(cfg, tmp_path / "bn")
    with pytest.raises(ConfigError, match="^engine: client=dpsgd needs engine=sequential"):
        build(compose_config([*FAST, "client=dpsgd", "engine=vectorized"]), tmp_path / "v")
    summary = build(compose_config([*FAST, "client=dpsgd", "rounds=2"]), tmp_path / "ok").run()
    assert summary["client_epsilon_max"] > 0
