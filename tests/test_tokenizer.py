"""data.tokenizer: Shakespeare as subword ids of a Hugging Face tokenizer (for model=hf
weights), with a small byte-level BPE tokenizer trained here on the fixture plays."""

from __future__ import annotations

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.data.shakespeare import shakespeare
from fedtorch.errors import ConfigError
from tests.conftest import compose_config
from tests.shakespeare_fixture import PLAY, SECOND_PLAY, fixture_run, write_plays

transformers = pytest.importorskip("transformers", reason="data.tokenizer needs the llm extra")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture
def tokenizer_dir(tmp_path):
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([PLAY, SECOND_PLAY], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    folder = tmp_path / "tokenizer"
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture
def plays(tmp_path):
    return write_plays(tmp_path / "data")


def test_sequences_hold_the_tokenizers_ids_with_masked_padding(plays, tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = shakespeare(plays, sequence_length=16, train_fraction=0.5, tokenizer=str(tokenizer_dir))
    chars = shakespeare(plays, sequence_length=16, train_fraction=0.5)
    assert data.num_classes == len(tok) and data.stats["tokenizer"] == str(tokenizer_dir)
    assert data.stats["clients"] == chars.stats["clients"]
    assert data.task.pad == -100
    # Targets are the inputs shifted by one; padding is -100 in the targets and the end
    # token in the inputs, so every input is a valid id.
    assert int(data.train_x.min()) >= 0 and int(data.train_x.max()) < len(tok)
    real = data.train_y != -100
    assert torch.equal(data.train_x[:, 1:][real[:, :-1]], data.train_y[:, :-1][real[:, :-1]])
    assert bool((data.train_x[:, 1:][~real[:, :-1]] == tok.eos_token_id).all())
    first = data.train_x[0]
    assert int(first[0]) == tok.bos_token_id
    # A row decodes back to the start of its speech.
    speech = tok.decode(first[1:].tolist())
    assert len(speech) > 16 and speech[:10] in PLAY + SECOND_PLAY
    # Subwords: fewer tokens than characters for the same text.
    assert data.stats["train_tokens"] < chars.stats["train_tokens"]


def test_a_hugging_face_model_trains_on_tokenizer_ids(tmp_path, plays, tokenizer_dir):
    overrides = fixture_run(
        plays,
        {"model": ["model=hf", "model.config.n_layer=1", "model.config.n_embd=16"]},
        [f"data.tokenizer={tokenizer_dir}", "adapter=lora", "adapter.r=2"],
    )
    orch = build(compose_config(overrides), tmp_path / "run")
    assert orch.model.hf_model.config.vocab_size == orch.data.num_classes
    summary = orch.run()
    assert summary["rounds_completed"] == 2 and summary["final_loss"] < 10.0


def test_a_tokenizer_that_cannot_be_loaded_is_one_line(tmp_path, plays):
    cfg = compose_config(fixture_run(plays, {}, [f"data.tokenizer={tmp_path}/none"]))
    with pytest.raises(ConfigError) as err:
        build(cfg, tmp_path / "run")
    message = str(err.value)
    assert message.startswith(f"data.tokenizer: cannot load '{tmp_path}/none': ")
    assert "\n" not in message
