"""Accounting that matches what is released, and privacy randomness from the OS CSPRNG:
adaptive clipping's centred count, fixed cohorts accounted without replacement, resumed
calibrated runs, DP-SGD's Poisson batches, and ``privacy.secure_mode``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.privacy import DifferentialPrivacy
from fedtorch.privacy import dp as dp_module
from fedtorch.privacy.noise import CsprngStream, secure_gaussian
from fedtorch.server.sampling import sample_cohort
from tests.conftest import FAST, compose_config


def _rdp_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta)


def test_adaptive_clipping_releases_the_centred_count(monkeypatch):
    """C <- C exp(-eta (b~ - gamma)), b~ = (sum_k (b_k - 1/2) + noise) / m + 1/2, by hand."""
    monkeypatch.setattr(dp_module, "gaussian_scalar", lambda *args: 0.0)
    dp = DifferentialPrivacy(
        clip_norm=1.0, noise_multiplier=0.5, adaptive_clipping=True, clip_learning_rate=0.2
    )
    dp.bind(num_clients=100, clients_per_round=40, rounds=3)
    dp.release(torch.zeros(3), unclipped_count=10.0, round_idx=1, reported=30)
    fraction = (10 - 30 / 2) / 40 + 0.5  # 0.375: not 10/40, the uncentred release
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * (fraction - 0.5)))


def test_adaptive_clipping_epsilon_is_that_of_the_composed_mechanism():
    """The issue's example: 25 of 100 clients, sigma_b = 1.25, z = 1, 30 rounds."""
    z, sigma_b, q, rounds, delta = 1.0, 1.25, 0.25, 30, 1e-5
    dp = DifferentialPrivacy(
        noise_multiplier=z, adaptive_clipping=True, clipped_count_stddev=sigma_b, delta=delta
    )
    dp.bind(num_clients=100, clients_per_round=25, rounds=rounds)
    for r in range(1, rounds + 1):
        _, metrics = dp.release(torch.zeros(4), 12.0, r, reported=25)
    z_update = dp.update_noise_multiplier
    assert z_update == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    # The released pair (sum of clipped updates, sum of centred bits), each scaled by its
    # noise: one client moves it by sqrt((C / (z_u C))^2 + (1/2 / sigma_b)^2).
    composed = (z_update**-2 + (0.5 / sigma_b) ** 2) ** -0.5
    by_hand = _rdp_epsilon(composed, q, rounds, delta)
    assert metrics["epsilon"] == pytest.approx(by_hand, rel=1e-9)
    assert metrics["epsilon"] == pytest.approx(10.9, abs=0.05)
    # Releasing the uncentred count (sensitivity 1) would have spent far more.
    uncentred = (z_update**-2 + (1 / sigma_b) ** 2) ** -0.5
    assert _rdp_epsilon(uncentred, q, rounds, delta) == pytest.approx(15.4, abs=0.1)


def test_fixed_cohorts_are_accounted_without_replacement():
    import dp_accounting as dpa
    from dp_accounting import rdp

    dp = DifferentialPrivacy(noise_multiplier=1.0, sampling="fixed")
    dp.bind(num_clients=100, clients_per_round=25, rounds=30)
    for r in range(1, 31):
        _, metrics = dp.release(torch.zeros(4), 0.0, r)
    by_hand = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    # Replacing one client moves the sum of clipped updates by up to 2C: multiplier z / 2.
    event = dpa.SampledWithoutReplacementDpEvent(100, 25, dpa.GaussianDpEvent(0.5))
    by_hand.compose(event, 30)
    assert metrics["epsilon"] == pytest.approx(by_hand.get_epsilon(1e-5), rel=1e-9)
    poisson = _rdp_epsilon(1.0, 0.25, 30, 1e-5)
    assert metrics["epsilon"] > poisson  # never the Poisson figure for fixed cohorts
    assert "without replacement" in dp.summary(False)["accounting"]
    with pytest.raises(ConfigError, match="^privacy.accountant: fixed-size cohorts"):
        DifferentialPrivacy(sampling="fixed", accountant="prv").bind(100, 25, 3)


def test_calibration_for_fixed_cohorts_meets_the_target():
    dp = DifferentialPrivacy(
        noise_multiplier=None, target_epsilon=8.0, on_budget="calibrate", sampling="fixed"
    )
    dp.bind(num_clients=100, clients_per_round=20, rounds=10)
    for r in range(1, 11):
        _, metrics = dp.release(torch.zeros(2), 0.0, r)
    assert 7.5 < metrics["epsilon"] <= 8.0 * (1 + 1e-9)


def test_a_calibrated_run_resumed_past_its_budget_is_refused():
    def calibrated(rounds: int) -> DifferentialPrivacy:
        dp = DifferentialPrivacy(noise_multiplier=None, target_epsilon=3.0, on_budget="calibrate")
        dp.bind(num_clients=100, clients_per_round=10, rounds=rounds)
        return dp

    first = calibrated(10)
    for r in range(1, 6):
        first.release(torch.zeros(2), 0.0, r)
    state = first.state_dict()
    same = calibrated(10)
    same.load_state_dict(state)  # the same horizon resumes
    assert same.noise_multiplier == first.noise_multiplier
    with pytest.raises(ConfigError, match="^rounds: resuming a run calibrated to"):
        calibrated(40).load_state_dict(state)


def test_dp_configs_default_to_poisson_sampling_and_say_what_is_accounted(tmp_path):
    cfg = compose_config([*FAST, "privacy=dp_central", "rounds=2"])
    assert cfg.privacy.sampling == "poisson"
    summary = build(cfg, tmp_path / "run").run()
    assert summary["client_sampling"] == "poisson"
    assert summary["accounting"].startswith("rdp, Poisson")
    assert summary["secure_mode"] is False
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["accounting"] == summary["accounting"]


def test_secure_noise_is_gaussian_and_never_repeats():
    a, b = secure_gaussian(200_000, 2.0), secure_gaussian(200_000, 2.0)
    assert not torch.equal(a, b)
    for draw in (a, b):
        assert abs(draw.mean().item()) < 0.03
        assert draw.std().item() == pytest.approx(2.0, rel=0.01)
        # Gaussian tails: about 4.55% beyond 2 sigma.
        assert (draw.abs() > 4.0).double().mean().item() == pytest.approx(0.0455, abs=0.003)
    u = CsprngStream().uniform(100_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_secure_mode_noise_differs_between_runs_with_the_same_seed():
    def released(secure: bool) -> torch.Tensor:
        dp = DifferentialPrivacy(noise_multiplier=1.0, secure_mode=secure)
        dp.bind(num_clients=10, clients_per_round=5, rounds=2, secure=secure)
        return dp.release(torch.zeros(1000), 0.0, 1)[0]

    assert torch.equal(released(False), released(False))  # seeded: repeats
    assert not torch.equal(released(True), released(True))  # CSPRNG: never
    with pytest.raises(ConfigError, match="^privacy.secure_mode: must be true, false or null"):
        DifferentialPrivacy(secure_mode="yes")


def test_secure_cohorts_come_from_the_csprng():
    seeded = sample_cohort(50, 10, 0, 3, poisson=False)
    assert seeded == sample_cohort(50, 10, 0, 3, poisson=False)
    draws = [tuple(sample_cohort(50, 10, 0, 3, poisson=False, secure=True)) for _ in range(5)]
    assert len(set(draws)) == 5 and all(len(set(d)) == 10 for d in draws)
    assert all(list(d) == sorted(d) and d[0] >= 0 and d[-1] < 50 for d in draws)
    sizes = [len(sample_cohort(1000, 100, 0, 1, poisson=True, secure=True)) for _ in range(20)]
    assert 80 < sum(sizes) / 20 < 120 and len(set(sizes)) > 1


def test_silos_turn_secure_mode_on_by_default(tmp_path):
    cfg = compose_config([*FAST, "privacy=dp_central"])
    assert cfg.privacy.secure_mode is None
    run = build(compose_config([*FAST, "privacy=dp_central", "privacy.secure_mode=true"]), tmp_path)
    assert run.privacy.secure


def test_dpsgd_batches_are_poisson_sampled_and_accounted_so():
    from fedtorch.client.dpsgd import DPSGDTrainer
    from fedtorch.results import ClientTask
    from fedtorch.state.layout import StateLayout

    model = torch.nn.Linear(3, 2)
    layout = StateLayout(model.state_dict())
    x, y = torch.randn(200, 3), torch.randint(0, 2, (200,))
    trainer = DPSGDTrainer(
        model, layout, x, y, lambda p: torch.optim.SGD(p, lr=0.1), steps=400, batch_size=4
    )
    batches, sizes = trainer.schedule(0, torch.arange(200), 1)
    assert len(sizes) == 400 and 0 in sizes and len(set(sizes)) > 3  # sizes vary, some empty
    assert sum(sizes) / 400 == pytest.approx(4, rel=0.15)  # q n = B on average
    rows = [set(batches[s][: sizes[s]].tolist()) for s in range(400)]
    assert all(len(r) == n for r, n in zip(rows, sizes))  # no sample twice in a batch
    vector = layout.flatten(model.state_dict())
    delta = torch.empty_like(vector)
    result = trainer.train(
        ClientTask(0, steps=400), torch.arange(200), model.state_dict(), vector, 1, delta
    )
    assert torch.isfinite(delta).all() and math.isfinite(result.metrics["train_loss"])
    expected = _rdp_epsilon(1.0, 4 / 200, 400, 1e-5)
    assert result.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
