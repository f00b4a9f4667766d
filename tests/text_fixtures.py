"""Small text fixtures built in the test: a word-level tokenizer from a vocabulary, a tiny
Llama-architecture model saved to a folder with it, and rows in every ``dataset=text``
format. Nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="dataset=text needs the llm extra")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("datasets", reason="dataset=text needs the llm extra")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
WORDS = (  # noqa: SIM905 - a sentence is easier to read than 50 quoted words
    "what does mean ? the a an of to is in on cat dog bird fish tree rose oak moss run "
    "walk swim fly eat sleep sing red green small big animal plant motion food water "
    "light dark fast slow hello world answer question say yes no one two three"
).split()
VOCAB = [*SPECIAL, *WORDS, "<|user|>", "<|assistant|>", "<|system|>"]
ANIMALS = ["cat", "dog", "bird", "fish"]
PLANTS = ["tree", "rose", "oak", "moss"]


def make_tokenizer(folder: Path, pad: bool = True, bos: bool = True, cls: bool = False) -> Path:
    """A whitespace word-level tokenizer over :data:`VOCAB`, saved to ``folder``.

    ``pad``: with a ``[PAD]`` pad token (id 0). ``bos``: with ``<s>`` as its begin token.
    ``cls``: wrap single texts as ``[CLS] ... [SEP]`` (as BERT's does).
    """
    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    if cls:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    special = {"unk_token": "[UNK]", "eos_token": "</s>"}
    if pad:
        special["pad_token"] = "[PAD]"
    if bos:
        special["bos_token"] = "<s>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.model_max_length = 64
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def make_llama(folder: Path, positions: int = 64) -> Path:
    """A tiny Llama-architecture causal LM over :data:`VOCAB` with its tokenizer, saved to
    ``folder`` (what a user's downloaded model folder looks like)."""
    torch = pytest.importorskip("torch")
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        pad_token_id=0,
        bos_token_id=4,
        eos_token_id=5,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    make_tokenizer(folder)
    return folder


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classification_rows(n_per_class: int = 12, clients: int = 3) -> list[dict]:
    """Animal vs plant sentences with a client and a topic column."""
    rows = []
    for i in range(n_per_class):
        for label, names in (("animal", ANIMALS), ("plant", PLANTS)):
            word = names[i % len(names)]
            verb = ["run", "swim", "fly", "walk"][i % 4] if label == "animal" else "green"
            rows.append(
                {
                    "text": f"the {word} is {verb} and {['small', 'big'][i % 2]}",
                    "label": label,
                    "user": f"u{i % clients}",
                    "topic": ["red", "green", "dark"][i % 3],
                }
            )
    return rows


def instruction_rows(n: int = 24, clients: int = 3) -> list[dict]:
    """Alpaca rows: "what does X mean ?" -> a short definition, one client per user."""
    rows = []
    for i in range(n):
        word = (ANIMALS + PLANTS)[i % 8]
        kind = "animal" if word in ANIMALS else "plant"
        rows.append(
            {
                "instruction": f"what does {word} mean ?",
                "input": "",
                "output": f"a small {kind}",
                "user": f"u{i % clients}",
                "category": kind,
            }
        )
    return rows
