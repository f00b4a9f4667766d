"""Vocabularies and next-token sequences (the form TFF gives Shakespeare).

Characters (the default): 0 is padding, 1..86 the 86 characters of TFF's Shakespeare
vocabulary, then out-of-vocabulary, begin and end of snippet (90 ids in all). A Hugging Face
tokenizer (``data.tokenizer``, the llm extra) gives subword ids instead, with its own begin
and end tokens; padding is then -100 in the targets (never a real id) and the end token in
the inputs (a padded input position only predicts a padded target, which is masked).

Each snippet (one speech) becomes ``BOS + tokens + EOS``, padded to a multiple of
``length + 1`` and cut into rows of ``length + 1``; a row gives the inputs ``row[:-1]`` and
the targets ``row[1:]``, so the next token is predicted at every position and no sequence
crosses two snippets. A row whose targets are all padding carries nothing to learn and is
dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtorch.errors import ConfigError, packaged_path, require

# TFF's (and Reddi et al. 2021's) Shakespeare character set, in its order.
CHARS = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
PAD = 0
OOV = len(CHARS) + 1
BOS = len(CHARS) + 2
EOS = len(CHARS) + 3
VOCAB_SIZE = len(CHARS) + 4

_INDEX = {ch: i + 1 for i, ch in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Token ids of ``text``'s characters (OOV for characters outside :data:`CHARS`)."""
    return [_INDEX.get(ch, OOV) for ch in text]


def decode(ids: Sequence[int]) -> str:
    """The text of token ids; PAD is dropped, OOV/BOS/EOS shown as ``<oov>``/``<s>``/``</s>``."""
    special = {PAD: "", OOV: "<oov>", BOS: "<s>", EOS: "</s>"}
    return "".join(special[i] if i in special else CHARS[i - 1] for i in ids)


def check_length(length: int) -> None:
    """Raise ConfigError unless ``length`` is an integer >= 2."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ConfigError("data.sequence_length", f"must be an integer >= 2, got {length!r}")


@dataclass(frozen=True)
class Vocabulary:
    """How text becomes token ids.

    Attributes:
        name: ``characters`` or the tokenizer's folder or hub id.
        encode: text -> token ids (no begin or end token).
        size: number of ids (the model's output width).
        bos, eos: begin and end of a snippet.
        target_pad: padding in the targets (masked out of loss and accuracy).
        input_pad: padding in the inputs (a valid id for the embedding).
    """

    name: str
    encode: Callable[[str], list[int]]
    size: int
    bos: int
    eos: int
    target_pad: int = PAD
    input_pad: int = PAD


CHARACTERS = Vocabulary("characters", encode, VOCAB_SIZE, BOS, EOS)


def load_hf_tokenizer(name_or_path: str, key: str = "data.tokenizer") -> Any:
    """A Hugging Face tokenizer (``AutoTokenizer.from_pretrained``: a folder, a
    ``pkg:PACKAGE/FOLDER`` inside an installed package, or a hub id in the local cache);
    one-line ConfigError on ``key`` if it cannot be loaded."""
    transformers = require("transformers", key, key)
    where = packaged_path(str(name_or_path), key)
    try:
        return transformers.AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(key, f"cannot load {name_or_path!r}: {reason}") from exc


def load_tokenizer(name_or_path: str) -> Vocabulary:
    """A Hugging Face tokenizer (:func:`load_hf_tokenizer`) as a :class:`Vocabulary`;
    one-line ConfigError if it cannot be used."""
    tokenizer = load_hf_tokenizer(name_or_path)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("data.tokenizer", f"{name_or_path!r} has no end-of-text token")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos

    def encode_text(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return Vocabulary(str(name_or_path), encode_text, len(tokenizer), bos, eos, -100, eos)


def snippet_rows(
    snippets: Sequence[str], length: int, vocabulary: Vocabulary = CHARACTERS
) -> torch.Tensor:
    """Every snippet as ``BOS + tokens + EOS`` rows of ``length + 1`` ids, [R, length + 1],
    padded with ``vocabulary.target_pad``.

    Rows whose targets (``row[1:]``) are all padding are left out.
    """
    check_length(length)
    width, pad = length + 1, vocabulary.target_pad
    rows: list[torch.Tensor] = []
    for snippet in snippets:
        ids = torch.tensor(
            [vocabulary.bos, *vocabulary.encode(snippet), vocabulary.eos], dtype=torch.long
        )
        padded = torch.full((-(-len(ids) // width) * width,), pad, dtype=torch.long)
        padded[: len(ids)] = ids
        rows.append(padded.view(-1, width))
    if not rows:
        return torch.zeros(0, width, dtype=torch.long)
    block = torch.cat(rows)
    return block[(block[:, 1:] != pad).any(dim=1)]


def inputs_and_targets(
    rows: torch.Tensor, vocabulary: Vocabulary = CHARACTERS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows[:, :-1], rows[:, 1:])`` as contiguous tensors, the inputs' padding set to
    ``vocabulary.input_pad``."""
    inputs = rows[:, :-1].contiguous()
    if vocabulary.input_pad != vocabulary.target_pad:
        inputs[inputs == vocabulary.target_pad] = vocabulary.input_pad
    return inputs, rows[:, 1:].contiguous()
