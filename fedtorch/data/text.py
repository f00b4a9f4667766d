"""Character vocabulary and next-character sequences (the form TFF gives Shakespeare).

Token ids: 0 is padding, 1..86 the 86 characters of TFF's Shakespeare vocabulary, then
out-of-vocabulary, begin and end of snippet (90 ids in all). Each snippet (one speech)
becomes ``BOS + characters + EOS``, padded with PAD to a multiple of ``length + 1`` and cut
into rows of ``length + 1``; a row gives the inputs ``row[:-1]`` and the targets
``row[1:]``, so the next character is predicted at every position and no sequence crosses
two snippets. A row whose targets are all padding carries nothing to learn and is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch.errors import ConfigError

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


def snippet_rows(snippets: Sequence[str], length: int) -> torch.Tensor:
    """Every snippet as ``BOS + chars + EOS`` rows of ``length + 1`` ids, [R, length + 1].

    Rows whose targets (``row[1:]``) are all padding are left out.
    """
    check_length(length)
    width = length + 1
    rows: list[torch.Tensor] = []
    for snippet in snippets:
        ids = torch.tensor([BOS, *encode(snippet), EOS], dtype=torch.long)
        padded = torch.full((-(-len(ids) // width) * width,), PAD, dtype=torch.long)
        padded[: len(ids)] = ids
        rows.append(padded.view(-1, width))
    if not rows:
        return torch.zeros(0, width, dtype=torch.long)
    block = torch.cat(rows)
    return block[(block[:, 1:] != PAD).any(dim=1)]


def inputs_and_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows[:, :-1], rows[:, 1:])`` as contiguous tensors."""
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
