"""Server memory against the number of clients a round, for mean-based and row-based rules.

One round of a 38M-parameter MLP (synthetic data, plain SGD, 2 local steps) for every
(rule, K) cell, each in a fresh process (``measure.py``). ``--tree`` picks which source
is measured: this checkout, or another checkout of fedtorch (e.g. an older commit, to
put the previous figures beside the new ones). Results go to
``results/<label>/<rule>-K<K>.json``; finished cells are skipped, so the study resumes
cell by cell. ``--table`` writes the table into README.md.

    python experiments/memory/run.py                      # this checkout, every cell
    python experiments/memory/run.py --tree /tmp/old --label main --ks 2,10
    python experiments/memory/run.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
COMMON = [
    "dataset=synthetic",
    "model=mlp",
    "model.hidden=[6144,6144]",  # 38.2M parameters (153 MB of float32)
    "num_clients=50",
    "rounds=1",
    "client.steps=2",
    "checkpoint.every=0",
    "logger=quiet",
    "device=cpu",
]
RULES = {
    "fedavg": ["strategy=fedavg"],
    "fedadam": ["strategy=fedadam"],
    "scaffold (client_state=disk)": ["strategy=scaffold", "strategy.client_state=disk"],
    "dp-fedavg + secure aggregation": [
        "strategy=fedavg",
        "privacy=dp_central",
        "privacy.sampling=fixed",  # exactly K clients a round, as the other rules
        "secure_aggregation.enabled=true",
    ],
    # f = 0 so that K = 3 is allowed (Krum needs K > 2f + 2).
    "krum (rows, 1024 MB budget)": ["strategy=krum", "strategy.num_byzantine=0"],
}
SLUGS = {name: name.split(" ")[0] for name in RULES}
START, END = "<!-- memory:start -->", "<!-- memory:end -->"


def ks_for(rule: str, ks: list[int]) -> list[int]:
    """Krum is undefined for K = 2 (it needs K > 2f + 2 = 2) and secure aggregation needs
    3 clients (with 2, the sum reveals each input to the other): both start at 3."""
    return [max(k, 3) for k in ks] if rule.startswith(("krum", "dp-fedavg")) else ks


def run_cell(tree: Path, rule: str, k: int) -> dict:
    overrides = [*COMMON, *RULES[rule], f"clients_per_round={k}"]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, str(HERE / "measure.py"), run_dir, *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"{rule} K={k}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(tree: Path, label: str, ks: list[int], only: list[str] | None) -> None:
    for rule in RULES:
        if only and SLUGS[rule] not in only:
            continue
        for k in ks_for(rule, ks):
            path = RESULTS / label / f"{SLUGS[rule]}-K{k}.json"
            if path.exists():
                continue
            t0 = time.perf_counter()
            result = run_cell(tree, rule, k)
            result["date"] = time.strftime("%Y-%m-%d")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(
                f"{label} {rule} K={k}: train peak {result['train_peak_mb']:.0f} MB, "
                f"baseline {result['baseline_mb']:.0f} MB "
                f"({result['above_baseline_models']:.2f} models above), "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )


def load(label: str, rule: str, k: int) -> dict | None:
    path = RESULTS / label / f"{SLUGS[rule]}-K{k}.json"
    return json.loads(path.read_text()) if path.exists() else None


def render_table(labels: list[str], ks: list[int]) -> str:
    """Rows: rule x K; columns per label: peak RSS of training, growth, models above."""
    header = ["rule", "K"]
    for label in labels:
        header += [
            f"{label}: peak RSS (MB)",
            f"{label}: above baseline (x model)",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rule in RULES:
        cells = {label: {k: load(label, rule, k) for k in ks_for(rule, ks)} for label in labels}
        for k in ks_for(rule, ks):
            row = [rule, str(k)]
            for label in labels:
                r = cells[label][k]
                if r is None:
                    row += ["not run", ""]
                    continue
                row += [f"{r['train_peak_mb']:,.0f}", f"{r['above_baseline_models']:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
    first = next((load(label, r, k) for label in labels for r in RULES for k in ks), None)
    note = ""
    if first:
        note = (
            f"Model: {first['model_mb']:.0f} MB of float32 parameters; baseline (RSS after "
            f"build: runtime, data, model, global weights) about {first['baseline_mb']:,.0f} "
            "MB. Peak RSS is the process's VmHWM from the end of build to the end of the run "
            "(the round, aggregation, evaluation, final save).\n\n"
        )
    return note + "\n".join(lines)


def growth_summary(label: str, ks: list[int]) -> str:
    """Per rule: peak at the largest K measured over the peak at the smallest."""
    out = []
    for rule in RULES:
        kk = [k for k in ks_for(rule, ks) if load(label, rule, k)]
        if len(kk) > 1:
            low, high = load(label, rule, kk[0]), load(label, rule, kk[-1])
            growth = 100 * (high["train_peak_mb"] / low["train_peak_mb"] - 1)
            out.append(f"{rule}: {growth:+.1f}% from K={kk[0]} to K={kk[-1]}")
    return "; ".join(out)


def write_table(labels: list[str], ks: list[int]) -> None:
    table = render_table(labels, ks)
    summary = growth_summary(labels[0], ks)
    text = f"{table}\n\nGrowth of the peak ({labels[0]}): {summary}."
    print(text)
    readme = HERE / "README.md"
    if readme.is_file() and START in readme.read_text():
        body = readme.read_text()
        head, rest = body.split(START, 1)
        readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(REPO), help="fedtorch source tree to measure")
    parser.add_argument("--label", default="streaming", help="results folder name")
    parser.add_argument("--ks", default="2,10,50", help="clients per round")
    parser.add_argument("--only", nargs="*", help="rule slugs (fedavg, fedadam, ...)")
    parser.add_argument("--table", nargs="*", help="write the table for these labels")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.table is not None:
        write_table(args.table or ["streaming", "main"], ks)
        return
    measure(Path(args.tree), args.label, ks, args.only)


if __name__ == "__main__":
    main()
