"""How one row of a text dataset becomes token ids (``dataset=text``), one format each.

A row of a language-model format becomes a :class:`Segment`: its token ids and, per token,
whether the model learns to predict it. The dataset then turns segments into rows of
``T + 1`` ids; a row gives the inputs ``row[:-1]`` and the targets ``row[1:]``, and a target
the model does not learn is -100 (left out of the loss, the accuracy and the token counts).

* ``text``: ``BOS + text + EOS``; every token is learned (BOS only where the tokenizer has a
  begin token of its own).
* ``prompt_response``: ``BOS + prompt + response + EOS``; only the response and EOS are
  learned. Prompt and response are tokenized separately, so the boundary is exact.
* ``instruction`` (Alpaca's ``instruction``/``input``/``output``): the prompt is Alpaca's
  template (:data:`ALPACA_PROMPT`, or :data:`ALPACA_PROMPT_NO_INPUT` when ``input`` is
  empty), the response is ``output``; learned as ``prompt_response``.
* ``chat`` (a ``messages`` list of ``{role, content}``): the conversation rendered by the
  tokenizer's chat template (``apply_chat_template``), or by :data:`PLAIN_CHAT_TEMPLATE`
  when the tokenizer has none; only the assistant turns are learned. A turn's characters
  run from the end of the conversation before it rendered with the generation prompt to
  the end of the conversation up to it; tokens starting there are learned.
* ``classification`` (``text`` + ``label``): the text with the tokenizer's own special
  tokens (``[CLS] ... [SEP]`` for BERT); the label is the class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtorch.errors import ConfigError, DataError

FORMATS = ("text", "prompt_response", "instruction", "chat", "classification")
LANGUAGE_MODEL_FORMATS = ("text", "prompt_response", "instruction", "chat")
IGNORE = -100

# Stanford Alpaca's prompts (Taori et al. 2023), as FlowerTune and OpenFedLLM use them.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# The chat template used when the tokenizer has none: each turn is "<|role|>", a newline,
# the content, the end-of-text token and a newline; the generation prompt is
# "<|assistant|>" and a newline.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The columns each format reads; optional ones in the second tuple.
COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("{text}",), ()),
    "prompt_response": (("prompt", "response"), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "classification": (("{text}", "{label}"), ()),
}


def required_columns(fmt: str, text_column: str, label_column: str) -> tuple[str, ...]:
    """The columns ``fmt`` needs, with the configured text and label column names."""
    names = {"{text}": text_column, "{label}": label_column}
    return tuple(names.get(c, c) for c in COLUMNS[fmt][0])


def detect_format(columns: Sequence[str], text_column: str, label_column: str) -> str | None:
    """The format the columns say (chat, instruction, prompt_response, classification,
    text, in that order of preference), or None."""
    for fmt in ("chat", "instruction", "prompt_response", "classification", "text"):
        if all(c in columns for c in required_columns(fmt, text_column, label_column)):
            return fmt
    return None


@dataclass
class Segment:
    """One row's token ids and, per id, whether the model learns to predict it."""

    ids: list[int]
    learned: list[bool]


class Encoder:
    """Turns rows into :class:`Segment` (language models) or id lists (classification).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        name: how the tokenizer was given (``data.tokenizer``), for messages.
        chat_template: a Jinja template replacing the tokenizer's (``data.chat_template``).
    """

    def __init__(self, tokenizer: Any, name: str, chat_template: str | None = None) -> None:
        self.tokenizer, self.name = tokenizer, name
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and bos != self.eos else []
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.template_key = "data.chat_template" if chat_template else "data.tokenizer"
        if self.template is None:
            self.template = PLAIN_CHAT_TEMPLATE
            self.template_key = "data.chat_template"

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def require_eos(self) -> None:
        if self.eos is None:
            raise ConfigError(
                "data.tokenizer",
                f"{self.name!r} has no end-of-text token, which a language model's rows end "
                "with; give a tokenizer with an eos_token",
            )

    def text(self, texts: Sequence[str]) -> list[Segment]:
        out = []
        for ids in self._ids(texts):
            full = [*self.bos, *ids, self.eos]
            out.append(Segment(full, [True] * len(full)))
        return out

    def prompt_response(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Segment]:
        out = []
        for p, r in zip(self._ids(prompts), self._ids(responses)):
            head = [*self.bos, *p]
            tail = [*r, self.eos]
            out.append(Segment(head + tail, [False] * len(head) + [True] * len(tail)))
        return out

    def instruction(
        self, instructions: Sequence[str], inputs: Sequence[str] | None, outputs: Sequence[str]
    ) -> list[Segment]:
        prompts = []
        for i, instruction in enumerate(instructions):
            extra = "" if inputs is None or inputs[i] is None else str(inputs[i]).strip()
            template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
            prompts.append(template.format(instruction=instruction, input=extra))
        return self.prompt_response(prompts, outputs)

    def chat(self, conversations: Sequence[Any]) -> list[Segment]:
        out = []
        for row, messages in enumerate(conversations):
            messages = _check_messages(messages, row)
            text, spans = self._render(messages, row)
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"]
            learned = [
                any(start <= begin < end for start, end in spans)
                for begin, _ in encoded["offset_mapping"]
            ]
            out.append(Segment(list(ids), learned))
        return out

    def _apply(self, messages: list[dict], generation: bool, row: int) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation,
            )
        except Exception as exc:  # Jinja raises its own errors (TemplateError, ...)
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise ConfigError(
                self.template_key,
                f"the chat template failed on row {row} ({type(exc).__name__}: {reason}); "
                "give a working Jinja template in data.chat_template",
            ) from exc

    def _render(self, messages: list[dict], row: int) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        text = self._apply(messages, False, row)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply(messages[:i], True, row) if i else ""
            upto = self._apply(messages[: i + 1], False, row)
            if not text.startswith(upto) or not upto.startswith(before):
                raise ConfigError(
                    self.template_key,
                    f"the chat template does not render row {row} turn by turn (the "
                    "conversation up to a turn is not the start of the whole), so the "
                    "assistant turns cannot be found; use a template without such changes",
                )
            spans.append((len(before), len(upto)))
        if not spans:
            raise DataError(f"chat row {row} has no assistant turn: nothing to learn from it")
        return text, spans

    def classification(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]


def _check_messages(messages: Any, row: int) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(
            f"chat row {row}: 'messages' must be a non-empty list of {{role, content}}, got "
            f"{type(messages).__name__}"
        )
    out = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                f"chat row {row}: every message needs 'role' and 'content', got {message!r:.80}"
            )
        out.append({"role": str(message["role"]), "content": str(message["content"])})
    return out


def targets(segment: Segment) -> tuple[list[int], list[int]]:
    """``(inputs, targets)`` of a segment: ``ids[:-1]`` and ``ids[1:]``, a target the model
    does not learn set to -100."""
    ids, learned = segment.ids, segment.learned
    return ids[:-1], [t if keep else IGNORE for t, keep in zip(ids[1:], learned[1:])]
