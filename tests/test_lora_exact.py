"""adapter.aggregation=exact (FedEx-LoRA): the math by hand, then what a run exchanges,
saves and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult
from fedtorch.state.layout import StateLayout
from fedtorch.strategies import FedAvg
from fedtorch.strategies.fedavg import MeanAggregator
from fedtorch.strategies.lora_exact import ExactLoRARound, lora_pairs
from tests.conftest import compose_config
from tests.kill_child import run_and_kill
from tests.shakespeare_fixture import fixture_run, write_plays
from tests.test_adapters import check_saved_model

peft = pytest.importorskip("peft", reason="adapter tests need the llm extra (peft)")

TINY_GPT = ["model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"]


def tiny_lora_layout() -> tuple[nn.Module, StateLayout]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"])
    model = peft.get_peft_model(model, config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return model, StateLayout(model.state_dict(), (), frozen)


def client(cid: int, n: int) -> ClientResult:
    return ClientResult(client_id=cid, num_samples=n, metrics={})


def test_exact_round_folds_the_residual_by_hand():
    model, layout = tiny_lora_layout()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (pair,) = lora_pairs(model, layout)
    assert pair.scale == 2.0 and not pair.transposed
    w0 = state[pair.base].clone()
    a0 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    b0 = torch.zeros(4, 2)
    state[pair.a].copy_(a0)
    state[pair.b].copy_(b0)
    start = layout.flatten(state)
    # Two clients, weights 1 and 3 (sample counts): their own A_k, B_k.
    a = [a0 + 1.0, a0 * 2.0]
    b = [torch.ones(4, 2), torch.arange(8.0).view(4, 2)]
    strategy = FedAvg()
    round_ = ExactLoRARound(
        MeanAggregator(strategy, start, 1), [pair], layout, start, state, strategy.client_weight
    )
    for k, n in enumerate((1, 3)):
        local = {pair.a: a[k], pair.b: b[k], pair.base: w0}
        round_.add(client(k, n), layout.flatten(local) - start)
    new = layout.split(round_.finish(), [pair.a, pair.b])
    # Separate averages for A and B; the base takes sum p_k s B_k A_k - s B' A'.
    a_mean, b_mean = 0.25 * a[0] + 0.75 * a[1], 0.25 * b[0] + 0.75 * b[1]
    assert torch.allclose(new[pair.a], a_mean) and torch.allclose(new[pair.b], b_mean)
    client_models = [w0 + 2.0 * b[k] @ a[k] for k in range(2)]
    exact_mean = 0.25 * client_models[0] + 0.75 * client_models[1]
    merged = state[pair.base] + 2.0 * new[pair.b] @ new[pair.a]
    assert torch.allclose(merged, exact_mean, atol=1e-5)
    # What separate averaging would have given differs: the residual is not zero here.
    assert not torch.allclose(w0 + 2.0 * b_mean @ a_mean, exact_mean, atol=1e-2)


def test_delta_weight_matches_peft_for_transposed_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    for module in model.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    layout = StateLayout(model.state_dict(), (), frozen)
    (pair,) = lora_pairs(model, layout)
    assert pair.transposed
    state = model.state_dict()
    layer = model.get_submodule(pair.base.removesuffix(".base_layer.weight"))
    ours = pair.delta_weight(state[pair.a], state[pair.b])
    assert ours.shape == state[pair.base].shape
    assert torch.allclose(ours, layer.get_delta_weight("default"))


@pytest.fixture
def plays(tmp_path):
    return write_plays(tmp_path / "data")


def exact_run(root, extra=()) -> list[str]:
    defaults = {
        "model": TINY_GPT + ["model.block_size=16"],
        "adapter": ["adapter=lora", "adapter.r=2", "adapter.aggregation=exact"],
    }
    return fixture_run(root, defaults, extra, clients_per_round=4)


def test_exact_run_sends_the_folded_base_every_round_and_saves_it(tmp_path, plays):
    orch = build(compose_config(exact_run(plays)), tmp_path / "run")
    before = {k: v.clone() for k, v in orch.global_state.items()}
    folded = orch.folded_keys
    assert folded and all(k.endswith("base_layer.weight") for k in folded)
    summary = orch.run()

    def size(keys):
        return sum(before[k].numel() * before[k].element_size() for k in keys)

    adapter, other_base = orch.layout.keys("mean"), set(orch.layout.keys("keep")) - folded
    assert summary["bytes_up"] == 2 * 4 * size(adapter)
    assert summary["bytes_down"] == 2 * 4 * (size(adapter) + size(folded)) + 4 * size(other_base)
    assert all(not torch.equal(orch.global_state[k], before[k]) for k in folded)
    assert all(torch.equal(orch.global_state[k], before[k]) for k in other_base)
    # The adapter folder plus the folded base reproduce the global model with peft.
    base_state = torch.load(tmp_path / "run" / "adapter" / "base_model.pt", weights_only=True)
    check_saved_model(orch, tmp_path / "run", base_state)


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
def test_exact_run_killed_mid_round_resumes_bit_identically(tmp_path, plays):
    settings = ["rounds=4", "checkpoint.every=1"]
    straight = build(compose_config(exact_run(plays, settings)), tmp_path / "straight")
    straight.run()
    killed = tmp_path / "killed"
    run_and_kill(killed, "mid-round:3", exact_run(plays, settings))
    saved = torch.load(killed / "checkpoints" / "round_000002.pt", weights_only=False)
    assert straight.folded_keys <= set(saved["global_state"])
    resumed = build(compose_config(exact_run(plays, [*settings, "resume=true"])), killed)
    resumed.run()
    for k in straight.global_state:
        assert torch.equal(resumed.global_state[k], straight.global_state[k]), k
    rows = [
        [json.loads(x)["test_loss"] for x in (tmp_path / d / "metrics.jsonl").open()]
        for d in ("straight", "killed")
    ]
    assert rows[0] == rows[1]


def test_both_engines_fold_alike(tmp_path, plays):
    states = {}
    for engine in ("sequential", "vectorized"):
        orch = build(compose_config(exact_run(plays, [f"engine={engine}"])), tmp_path / engine)
        orch.run()
        states[engine] = orch.global_state
    for k, v in states["sequential"].items():
        assert torch.allclose(v.float(), states["vectorized"][k].float(), atol=1e-5), k


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["strategy=fedadam"],
            "adapter.aggregation: exact needs a strategy whose new adapters are the clients' "
            "weighted mean (fedavg, fedprox); FedAdam is not one (use aggregation=separate)",
        ),
        (
            ["privacy=dp_central"],
            "adapter.aggregation: exact needs each client's B A, which privacy and secure "
            "aggregation hide from the server (use aggregation=separate)",
        ),
        (
            ["adapter.aggregation=mean"],
            "adapter.aggregation: must be separate or exact, got 'mean'",
        ),
        (
            ["key_rules=[{pattern: lora_B, rule: local}]"],
            "adapter.aggregation: exact needs base_model.model.blocks.0.attn.qkv.lora_B."
            "default.weight to have the rule 'mean', it has 'local' (check key_rules)",
        ),
    ],
)
def test_bad_exact_settings_fail_before_training(tmp_path, plays, overrides, message):
    with pytest.raises(ConfigError) as err:
        build(compose_config(exact_run(plays, overrides)), tmp_path / "run")
    assert str(err.value) == message
