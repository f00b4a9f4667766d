"""The bad-input table of dataset=text: each entry is a command-line mistake with text
data and the one line it gets (checked by ``tests/test_text_bad_input.py``, listed in the
README's errors table). Placeholders are files the test writes: ``{rows}`` (labelled
sentences with a ``user`` and a ``topic`` column), ``{alpaca}`` (instruction rows),
``{chat}`` (conversations), ``{long}`` (long sentences), ``{one_label}``, ``{empty}``, a
tokenizer ``{tok}`` and one without a pad token ``{no_pad}``; ``{tmp}`` a scratch folder."""

from __future__ import annotations

# A small valid text classification run every entry adds its overrides to.
BASE = [
    "dataset=text",
    "data.files={rows}",
    "data.tokenizer={tok}",
    "data.cache_dir={tmp}/cache",
    "model=hf",
    "model.head=sequence_classification",
    "~model.config",
    "+model.config={model_type: bert, hidden_size: 16, num_hidden_layers: 1, "
    "num_attention_heads: 2, intermediate_size: 32, max_position_embeddings: 16}",
    "num_clients=3",
    "rounds=1",
    "device=cpu",
    "logger=quiet",
]

# (what, overrides added to BASE, start of the error line after "error: ")
CASES: list[tuple[str, list[str], str]] = [
    (
        "text rows without the format's columns",
        ["data.format=prompt_response"],
        "data.files: {rows} lacks column(s) prompt, response that format prompt_response and "
        "the data.*_column keys need; it has text, label, user, topic",
    ),
    (
        "misnamed client column",
        ["data.client_column=usr"],
        "data.files: {rows} lacks column(s) usr that format classification",
    ),
    ("empty text file", ["data.files={empty}"], "data.files: {empty} is empty (no rows)"),
    (
        "unknown text format",
        ["data.format=tsv"],
        "data.format: must be auto, text, prompt_response, instruction, chat or classification, "
        "got 'tsv'",
    ),
    (
        "no text files",
        ["data.files=null"],
        "data.files: give the training rows: data.files=PATH",
    ),
    (
        "text without a tokenizer",
        ["data.tokenizer=null"],
        "data.tokenizer: dataset=text needs a Hugging Face tokenizer",
    ),
    (
        "tokenizer without a pad token",
        ["data.tokenizer={no_pad}"],
        "data.tokenizer: '{no_pad}' has no pad token, which classification rows are padded with; "
        "set data.pad_token='</s>' (its end-of-text token)",
    ),
    (
        "label column with one value",
        ["data.files={one_label}"],
        "data.label_column: the training rows' labels have one value ('animal'); "
        "classification needs two or more",
    ),
    (
        "fewer clients in the client column than clients_per_round",
        ["partition=natural", "data.client_column=user", "clients_per_round=5"],
        "clients_per_round: 5, but data.client_column='user' gives 3 client(s)",
    ),
    (
        "held-out rows per client without a client column",
        ["data.client_test_fraction=0.2"],
        "data.client_test_fraction: holds out rows of each client: set data.client_column",
    ),
    (
        "chat template that fails",
        ["data.files={chat}", "data.chat_template='{{ no_such_function() }}'"],
        "data.chat_template: the chat template failed on row 0 (UndefinedError",
    ),
    (
        "rows longer than sequence_length without truncation",
        ["data.sequence_length=4", "data.truncation=false"],
        "data.truncation: false, but",
    ),
    (
        "rows longer than the model's positions",
        ["data.files={long}", "data.sequence_length=null", "data.truncation=false"],
        "data.sequence_length: rows of 22 tokens are longer than the model's 16 positions",
    ),
    (
        "label-based split of language-model rows",
        ["data.files={alpaca}", "partition=dirichlet"],
        "partition: dirichlet splits rows by class, but the rows of text (a language model) "
        "have none; set data.category_column",
    ),
    (
        "hub dataset offline",
        ["data.files=null", "data.hub=nobody/no-such-dataset"],
        "data.hub: cannot load 'nobody/no-such-dataset' split 'train' from the Hugging Face hub",
    ),
]
