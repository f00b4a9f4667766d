"""Robust aggregators against FedAvg under 20% sign-flipping clients (Fashion-MNIST).

Every cell is ``+experiment=fmnist_robust`` (20 IID clients, all sampled, 4 of them send
-5x their update) with one aggregator; ``fedavg_clean`` is FedAvg without attackers, the
accuracy to hold. Each aggregator is told f = 4 where it takes one. Resumable: a cell with
a ``summary.json`` is skipped. Writes ``results/table.md`` and the table in README.md.

    python experiments/robust/run.py [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import load_run, replace_block, run_fedtorch  # noqa: E402

RUNS = HERE / "results" / "runs"
CELLS = {
    "fedavg_clean": ["strategy=fedavg", "attack=none"],
    "fedavg": ["strategy=fedavg"],
    "median": ["strategy=median"],
    "trimmed_mean": ["strategy=trimmed_mean", "strategy.beta=0.2"],
    "krum": ["strategy=krum", "strategy.num_byzantine=4"],
    "multikrum": ["strategy=multikrum", "strategy.num_byzantine=4", "strategy.num_selected=10"],
    "bulyan": ["strategy=bulyan", "strategy.num_byzantine=4"],
}


def table() -> str:
    lines = [
        "| aggregator | attack | final acc (%) | best acc (%) | round time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, overrides in CELLS.items():
        loaded = load_run(RUNS / name)
        attack = "none" if "attack=none" in overrides else "20% sign-flip x5"
        if loaded is None:
            lines.append(f"| {name} | {attack} | — | — | — |")
            continue
        summary, rows = loaded
        per_round = sum(r["round_time_s"] for r in rows) / len(rows)
        lines.append(
            f"| {name} | {attack} | {100 * summary['final_accuracy']:.2f} | "
            f"{100 * summary['best_accuracy']:.2f} | {per_round:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args()
    for name, overrides in CELLS.items():
        if load_run(RUNS / name) is None:
            run_fedtorch(["+experiment=fmnist_robust", *overrides], RUNS / name, args.threads)
    text = table()
    (HERE / "results" / "table.md").write_text(text + "\n")
    replace_block(HERE / "README.md", "table", text)
    print(text)


if __name__ == "__main__":
    main()
