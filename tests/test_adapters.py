"""LoRA adapters through peft: what is trained, exchanged, saved and resumed."""

from __future__ import annotations

import json

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.models import GPT
from tests.conftest import compose_config
from tests.shakespeare_fixture import fixture_run, write_plays

peft = pytest.importorskip("peft", reason="adapter tests need the llm extra (peft)")

TINY_GPT = [
    "model=gpt",
    "model.n_layer=1",
    "model.n_embd=16",
    "model.n_head=2",
    "model.block_size=16",
]


def lora_run(root, extra=()) -> list[str]:
    defaults = {"model": TINY_GPT, "adapter": ["adapter=lora", "adapter.r=2"]}
    return fixture_run(root, defaults, extra, clients_per_round=4)


@pytest.fixture
def plays(tmp_path):
    return write_plays(tmp_path / "data")


def test_lora_exchanges_only_the_adapter_and_leaves_the_base_untouched(tmp_path, plays):
    orch = build(compose_config(lora_run(plays)), tmp_path / "run")
    before = {k: v.clone() for k, v in orch.global_state.items()}
    adapter_keys = [k for k in orch.layout.rules if "lora_" in k]
    base_keys = orch.layout.keys("keep")
    assert adapter_keys and set(orch.layout.keys("mean")) == set(adapter_keys)
    assert base_keys and not set(base_keys) & set(adapter_keys)
    summary = orch.run()
    adapter_bytes = sum(before[k].numel() * before[k].element_size() for k in adapter_keys)
    base_bytes = sum(before[k].numel() * before[k].element_size() for k in base_keys)
    # 4 clients a round, 2 rounds: the adapter both ways every round, the base down once.
    assert summary["bytes_up"] == 2 * 4 * adapter_bytes
    assert summary["bytes_down"] == 2 * 4 * adapter_bytes + 4 * base_bytes
    for k in base_keys:
        assert torch.equal(orch.global_state[k], before[k]), k
    assert any(not torch.equal(orch.global_state[k], before[k]) for k in adapter_keys)
    assert summary["trainable_parameters"] == sum(before[k].numel() for k in adapter_keys)


def check_saved_model(orch, run_dir, base_state) -> None:
    """The tiny GPT with ``base_state`` plus ``run_dir/adapter`` (loaded by peft), and
    ``run_dir/model.pt``, both give the run's global model's logits."""
    tokens = orch.data.test_x[:3]
    orch.model.load_state_dict(orch.global_state)
    orch.model.eval()
    with torch.no_grad():
        expected = orch.model(tokens)
    base = GPT(vocab_size=90, n_layer=1, n_embd=16, n_head=2, block_size=16)
    base.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    merged = GPT(vocab_size=90, n_layer=1, n_embd=16, n_head=2, block_size=16).eval()
    merged.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), expected, atol=1e-5)
        assert torch.allclose(merged(tokens), expected, atol=1e-5)


def test_saved_adapter_and_merged_model_reproduce_the_global_model(tmp_path, plays):
    orch = build(compose_config(lora_run(plays)), tmp_path / "run")
    orch.run()
    base_state = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in orch.global_state.items()
        if "lora_" not in k
    }
    check_saved_model(orch, tmp_path / "run", base_state)


def test_lora_checkpoint_holds_no_base_and_resumes_bit_identically(tmp_path, plays):
    straight = build(compose_config(lora_run(plays, ["rounds=4"])), tmp_path / "straight")
    straight.run()
    first = compose_config(lora_run(plays, ["rounds=2", "checkpoint.every=1"]))
    build(first, tmp_path / "split").run()
    saved = torch.load(tmp_path / "split" / "checkpoints" / "round_000002.pt", weights_only=False)
    assert all("lora_" in k for k in saved["global_state"])
    again = compose_config(lora_run(plays, ["rounds=4", "checkpoint.every=1", "resume=true"]))
    resumed = build(again, tmp_path / "split")
    resumed.run()
    assert torch.equal(resumed.global_vector, straight.global_vector)
    rows = [
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("straight", "split")
    ]
    key = ("round", "train_loss", "test_loss", "bytes_up", "bytes_down")
    assert [[r[k] for k in key] for r in rows[0]] == [[r[k] for k in key] for r in rows[1]]


def test_both_engines_train_lora_alike(tmp_path, plays):
    vectors = {}
    for engine in ("sequential", "vectorized"):
        orch = build(compose_config(lora_run(plays, [f"engine={engine}"])), tmp_path / engine)
        orch.run()
        vectors[engine] = orch.global_vector
    assert torch.allclose(vectors["sequential"], vectors["vectorized"], atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adapter.r=0"], "adapter.r: must be an integer >= 1, got 0"),
        (
            ["adapter.target_modules=[nope]"],
            "adapter.target_modules: 'nope' matches no Linear, Embedding or Conv layer of GPT",
        ),
        (
            ["model=char_lstm"],
            "adapter.target_modules: all-linear: CharLSTM has no linear layer besides its "
            "output layer",
        ),
    ],
)
def test_bad_adapter_settings_fail_before_training(tmp_path, plays, overrides, message):
    cfg = compose_config(lora_run(plays, overrides))
    with pytest.raises(ConfigError) as err:
        build(cfg, tmp_path / "run")
    assert str(err.value).startswith(message), str(err.value)


def test_hugging_face_model_from_a_config_trains_with_lora(tmp_path, plays):
    pytest.importorskip("transformers")
    hf = [
        "model=hf",
        "model.config.n_layer=1",
        "model.config.n_embd=16",
        "model.config.n_positions=16",
    ]
    orch = build(compose_config(lora_run(plays, hf)), tmp_path / "run")
    assert set(orch.layout.keys("mean")) == {k for k in orch.layout.rules if "lora_" in k}
    summary = orch.run()
    assert summary["rounds_completed"] == 2 and summary["final_loss"] < 5.0
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=hf", "model.name_or_path=/no/such/model", "model.config=null"],
            "model.name_or_path: /no/such/model is not a folder",
        ),
        (["model=hf", "adapter.target_modules=[nope]"], "adapter.target_modules: Target modules"),
        pytest.param(
            ["model=hf", "model.quantization=4bit", "device=cpu"],
            "model.quantization: 4bit needs CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists"),
        ),
    ],
)
def test_bad_hugging_face_settings_fail_before_training(
    tmp_path, plays, monkeypatch, overrides, message
):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        build(compose_config(lora_run(plays, overrides)), tmp_path / "run")
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_sequence_model_on_a_classification_dataset_fails_in_one_line(tmp_path):
    cfg = compose_config(["dataset=synthetic", *TINY_GPT, "device=cpu"])
    with pytest.raises(ConfigError) as err:
        build(cfg, tmp_path)
    assert str(err.value).startswith("model: forward pass on inputs of shape [1, 8, 8] failed")


def test_init_from_starts_the_base_from_saved_weights(tmp_path, plays):
    first = compose_config(lora_run(plays, ["adapter=none", "rounds=1"]))
    build(first, tmp_path / "full").run()
    saved = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    cfg = compose_config(lora_run(plays, [f"init_from={tmp_path / 'full' / 'model.pt'}"]))
    orch = build(cfg, tmp_path / "lora")
    for key in orch.layout.keys("keep"):
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(orch.global_state[key], saved[plain]), key


@pytest.mark.parametrize(
    "value, message",
    [
        ("{tmp}/nowhere.pt", "init_from: {tmp}/nowhere.pt is not a file"),
        ("{tmp}/other.pt", "init_from: {tmp}/other.pt does not fit the model: missing"),
    ],
)
def test_bad_init_from(tmp_path, plays, value, message):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    value, message = value.format(tmp=tmp_path), message.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as err:
        build(compose_config(lora_run(plays, [f"init_from={value}"])), tmp_path / "run")
    assert str(err.value).startswith(message), str(err.value)


def test_privacy_and_secure_aggregation_work_on_adapter_updates(tmp_path, plays):
    extra = [
        "privacy=dp_central",
        "privacy.noise_multiplier=0.5",
        "secure_aggregation.enabled=true",
        "clients_per_round=4",
        # Four clients every round: the fewest whose graph tolerates one drop-out and one
        # corrupted client (secure_aggregation's default rates, rounded up).
        "privacy.sampling=fixed",
    ]
    orch = build(compose_config(lora_run(plays, extra)), tmp_path / "run")
    before = {k: v.clone() for k, v in orch.global_state.items()}
    summary = orch.run()
    assert summary["epsilon"] > 0
    for key in orch.layout.keys("keep"):
        assert torch.equal(orch.global_state[key], before[key])
    assert not torch.equal(orch.global_vector, orch.layout.flatten(before))


def test_compression_applies_to_the_adapter_updates_only(tmp_path, plays):
    """Top-k with error feedback on LoRA: only the adapters travel, compressed; the frozen
    base still goes down once per client, uncompressed."""
    from fedtorch.compression import Compression

    cfg = compose_config(
        lora_run(
            plays,
            ["compression=topk", "compression.fraction=0.1", "compression.error_feedback=true"],
        )
    )
    orch = build(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in orch.global_state.items()}
    adapter_keys = orch.layout.keys("mean")
    base_keys = orch.layout.keys("keep")
    summary = orch.run()
    reference = Compression(kind="topk", fraction=0.1)
    reference.bind(orch.layout, 1, None)
    one = reference.compressor.encode(torch.randn(orch.layout.size)).nbytes
    adapter_bytes = sum(before[k].numel() * 4 for k in adapter_keys)
    base_bytes = sum(before[k].numel() * before[k].element_size() for k in base_keys)
    assert summary["bytes_up"] == 2 * 4 * one
    assert summary["bytes_down"] == 2 * 4 * adapter_bytes + 4 * base_bytes
    assert summary["compression_ratio"] == pytest.approx(adapter_bytes / one)
    assert orch.compression.residuals.state_dict()  # residuals of the clients that trained
    for k in base_keys:
        assert torch.equal(orch.global_state[k], before[k]), k
