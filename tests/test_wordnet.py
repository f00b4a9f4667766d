"""python -m fedtorch.data.fetch wordnet: WordNet's database as classification and
instruction JSONL, on a small database written here (and Debian's, when installed)."""

from __future__ import annotations

import json

import pytest

from fedtorch.data.fetch import LEXNAMES, WORDNET_DIR, fetch_wordnet, main, parse_wordnet_line

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUNS = (
    "00015388 05 n 03 animal 0 animate_being 0 beast 0 000 | a living organism characterized "
    'by voluntary movement; "animals are not plants"  \n'
    "00017222 20 n 01 plant 0 000 | (botany) a living organism lacking the power of locomotion  \n"
    "02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis  \n"
)
VERBS = '01835496 38 v 01 travel 0 000 01 + 02 00 | change location; move; "He travels"  \n'
ADJECTIVES = (
    "00002098 00 a 01 able(a) 0 000 | (usually followed by `to') having the necessary means  \n"
)


def write_database(folder):
    folder.mkdir(parents=True)
    for name, body in (("data.noun", NOUNS), ("data.verb", VERBS), ("data.adj", ADJECTIVES)):
        (folder / name).write_text(LICENCE + body)
    (folder / "data.adv").write_text(LICENCE)
    return folder


def test_a_data_line_gives_words_category_and_definition():
    synset = parse_wordnet_line(NOUNS.splitlines()[0])
    assert synset == {
        "synset": "00015388n",
        "pos": "noun",
        "words": ["animal", "animate being", "beast"],
        "category": "noun.animal",
        "definition": "a living organism characterized by voluntary movement",
    }
    assert parse_wordnet_line(LICENCE) is None
    assert parse_wordnet_line(ADJECTIVES)["words"] == ["able"]
    assert len(LEXNAMES) == 45 and LEXNAMES[38] == "verb.motion"


def test_fetch_writes_classification_and_instruction_rows(tmp_path, capsys):
    source = write_database(tmp_path / "wn")
    assert main(["wordnet", "--root", str(tmp_path / "data"), "--wordnet", str(source)]) == 0
    assert "5 synsets" in capsys.readouterr().out
    folder = tmp_path / "data" / "wordnet"
    rows = [json.loads(line) for line in (folder / "classification.jsonl").open()]
    assert [r["label"] for r in rows] == [
        "noun.animal",
        "noun.plant",
        "noun.animal",
        "verb.motion",
        "adj.all",
    ]
    assert rows[3]["text"] == "change location; move"
    instructions = [json.loads(line) for line in (folder / "instruction.jsonl").open()]
    assert instructions[2] == {
        "instruction": "What does 'dog' (noun) mean?",
        "input": "",
        "output": "a member of the genus Canis",
        "category": "noun.animal",
        "synset": "02084071n",
    }
    fetch_wordnet(tmp_path / "small", source, per_category=1)
    small = [json.loads(line) for line in (tmp_path / "small/wordnet/classification.jsonl").open()]
    assert sorted(r["label"] for r in small) == [
        "adj.all",
        "noun.animal",
        "noun.plant",
        "verb.motion",
    ]


def test_a_missing_database_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install wordnet-base"):
        main(["wordnet", "--root", str(tmp_path), "--wordnet", str(tmp_path / "none")])


@pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file(), reason="apt-get install wordnet-base"
)
def test_debians_wordnet_parses():
    with open(WORDNET_DIR / "data.noun", encoding="utf-8") as fh:
        synsets = [s for s in (parse_wordnet_line(next(fh)) for _ in range(200)) if s]
    assert synsets[0]["words"] == ["entity"] and synsets[0]["category"] == "noun.Tops"
    assert all(s["category"].startswith("noun.") and s["definition"] for s in synsets)
