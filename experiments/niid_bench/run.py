"""NIID-Bench on Fashion-MNIST: partitions x algorithms, one fedtorch run per cell.

Setting (Li et al. 2022; Flower's reproduction): 10 clients, all sampled every round,
50 rounds, E = 10 local epochs, B = 64, SGD lr 0.01 momentum 0.9 weight decay 1e-5,
simple CNN; partitions IID, Dir(0.5), #C=1, #C=2, #C=3; FedAvg, FedProx (mu tuned over
0.001, 0.01, 0.1, 1), SCAFFOLD, FedNova. Everything but the partition and the algorithm
comes from the ``fmnist_dirichlet`` preset.

Resumable run by run: a cell whose ``summary.json`` exists is skipped, so the grid can be
run in parts (``--only``); a cell that another live invocation is running (its
``.running`` file names the pid) is skipped too, so invocations can share the grid; an
interrupted cell continues from its last checkpoint (every 5 rounds) with ``resume=true``.
Every finished cell rewrites ``results/table.md`` and the table in README.md. A run that
fails (a diverged one whose clients all send NaN, say) gets a ``FAILED.md`` in its folder
and the invocation goes on with the next cell; later invocations skip it until the file is
deleted.

    python experiments/niid_bench/run.py                  # everything still missing
    python experiments/niid_bench/run.py --jobs 2         # two cells at a time (2 cores)
    python experiments/niid_bench/run.py --only dir0.5    # cells whose name contains it
    python experiments/niid_bench/run.py --list           # cells and their state
    python experiments/niid_bench/run.py --table          # only rebuild the table
    python experiments/niid_bench/run.py --jobs 2 --stop-at 20:15
    python experiments/niid_bench/run.py --checks         # the side runs (CHECKS) instead

``--stop-at HH:MM`` (local time) starts no cell after that time and interrupts the running
ones then, as Ctrl-C would: each checkpoints its last finished round and gets an
``IN_PROGRESS.md`` saying how far it got. Checkpoints are git-ignored; to carry a stopped
cell to another machine, commit its newest checkpoint with ``git add -f`` (the script
prints the paths).

``--checks`` runs the side runs in ``CHECKS`` instead of the grid: one cell re-run with
one setting changed, to test an explanation of a gap. They live beside the grid's cells
(``results/runs/<partition>/<name>``) and stay out of the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import REPO, interruptible, replace_block, run_fedtorch, stop_time  # noqa: E402

RUNS = HERE / "results" / "runs"

PARTITIONS = {
    "iid": ["partition=iid"],
    "dir0.5": ["partition=dirichlet", "partition.alpha=0.5"],
    "c1": ["partition=label_skew", "partition.classes_per_client=1"],
    "c2": ["partition=label_skew", "partition.classes_per_client=2"],
    "c3": ["partition=label_skew", "partition.classes_per_client=3"],
}
PARTITION_NAMES = {
    "iid": "IID",
    "dir0.5": "Dir(0.5)",
    "c1": "#C=1",
    "c2": "#C=2",
    "c3": "#C=3",
}
MUS = ("0.01", "0.001", "0.1", "1")  # the default first, then the rest of the tuning grid
ALGORITHMS = {
    "fedavg": ["strategy=fedavg"],
    "scaffold": ["strategy=scaffold"],
    "fednova": ["strategy=fednova"],
    **{f"fedprox_mu{mu}": ["strategy=fedprox", f"client.prox_mu={mu}"] for mu in MUS},
}
# Side runs (see --checks): a grid cell with one setting changed, each testing an explanation
# of a gap to Flower's figures. Flower feeds ToTensor's [0, 1] pixels and seeds with 42.
VARIANTS = {
    "fednova_raw_pixels": ["strategy=fednova", "data.normalize=false"],
    "fedavg_raw_pixels": ["strategy=fedavg", "data.normalize=false"],
    "fednova_seed42": ["strategy=fednova", "seed=42"],
    "fedavg_seed42": ["strategy=fedavg", "seed=42"],
    "scaffold_raw_pixels": ["strategy=scaffold", "data.normalize=false"],
    # Flower's FedProx runs at mu = 0.01 (its fedprox_base.yaml).
    "fedprox_raw_pixels": ["strategy=fedprox", "client.prox_mu=0.01", "data.normalize=false"],
}
CHECKS = [
    ("c2", "fednova_raw_pixels"),
    ("c2", "fednova_seed42"),
    ("c2", "fedavg_seed42"),
    ("c2", "fedavg_raw_pixels"),
    ("c1", "fedavg_raw_pixels"),
    ("c1", "scaffold_raw_pixels"),
    ("c1", "fedavg_seed42"),
    ("c1", "fedprox_raw_pixels"),
]
# Flower's NIID-Bench reproduction (baselines/niid_bench/README.md), Fashion-MNIST: best test
# accuracy (%) as mean and standard deviation over its seeds.
PUBLISHED = {
    "iid": {
        "fedavg": (89.23, 0.45),
        "scaffold": (89.33, 0.27),
        "fedprox": (89.42, 0.09),
        "fednova": (89.36, 0.09),
    },
    "dir0.5": {
        "fedavg": (88.09, 0.29),
        "scaffold": (88.44, 0.25),
        "fedprox": (88.15, 0.42),
        "fednova": (88.22, 0.12),
    },
    "c1": {
        "fedavg": (28.39, 17.09),
        "scaffold": (10.00, 0.00),
        "fedprox": (32.65, 6.68),
        "fednova": (16.86, 9.30),
    },
    "c2": {
        "fedavg": (78.10, 2.51),
        "scaffold": (33.80, 41.22),
        "fedprox": (78.05, 0.99),
        "fednova": (71.67, 2.34),
    },
    "c3": {
        "fedavg": (82.43, 1.52),
        "scaffold": (80.32, 5.03),
        "fedprox": (82.99, 0.48),
        "fednova": (81.97, 1.34),
    },
}
GAP_POINTS = 1.5  # gaps wider than this are flagged and explained in the README
# Flower's figures are over three seeds, as far as its numbers tell: its #C=2 SCAFFOLD, 33.80 ±
# 41.22, is exactly the mean and sample standard deviation of 81.4, 10.0 and 10.0 (one run
# converged, two stuck at chance); two runs would need one at 4.65%, below chance.
PUBLISHED_SEEDS = 3


def seed_range(mean: float, std: float, n: int = PUBLISHED_SEEDS) -> tuple[float, float]:
    """The interval any one of ``n`` runs with this sample mean and standard deviation lies
    in: no value is further than ``std * (n - 1) / sqrt(n)`` from the mean (the bound is
    reached when the other ``n - 1`` runs are equal). Ours inside it could have been one of
    Flower's own runs; outside it, the spread of Flower's seeds cannot explain the gap (our
    own seed may still be an outlier: test with another seed, see CHECKS)."""
    half = std * (n - 1) / math.sqrt(n)
    return mean - half, mean + half


COLUMNS = ("fedavg", "fedprox", "scaffold", "fednova")


RUN_ORDER = ("dir0.5", "iid", "c2", "c3", "c1")  # the common settings first


def cells() -> list[tuple[str, str]]:
    """(partition, algorithm) in run order: every algorithm once (FedProx at mu=0.01) on
    each partition first, then the remaining FedProx mu values."""
    first = [a for a in ALGORITHMS if not a.startswith("fedprox")] + ["fedprox_mu0.01"]
    rest = [a for a in ALGORITHMS if a.startswith("fedprox") and a != "fedprox_mu0.01"]
    return [(p, a) for p in RUN_ORDER for a in first] + [(p, a) for p in RUN_ORDER for a in rest]


def summary(partition: str, algorithm: str) -> dict | None:
    path = RUNS / partition / algorithm / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def failure(partition: str, algorithm: str) -> str | None:
    """The first line of the cell's ``FAILED.md`` if its run failed, else None."""
    path = RUNS / partition / algorithm / "FAILED.md"
    return path.read_text().splitlines()[0] if path.exists() else None


def record_failure(out: Path, code: int) -> str:
    """Write ``FAILED.md`` for a run that exited with ``code``: the last round it logged, and
    the error line and last warning of its ``train.log`` (a diverged run says which clients
    sent NaN). Returns the file's first line."""
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    log = (out / "train.log").read_text().splitlines() if (out / "train.log").exists() else []
    errors = [line.split(" - ", 1)[-1] for line in log if "[ERROR]" in line]
    warnings = [line.split(" - ", 1)[-1] for line in log if "[WARNING]" in line]
    first = f"failed: exit status {code} after round {rows[-1]['round'] if rows else 0}"
    text = [first, ""]
    if errors:
        text += ["Its error, from train.log:", "", f"    {errors[-1]}", ""]
    if warnings:
        text += ["Last warning in train.log:", "", f"    {warnings[-1]}", ""]
    text += ["Later invocations skip this cell; delete this file to run it again."]
    (out / "FAILED.md").write_text("\n".join(text) + "\n")
    return first


def claimed_by(partition: str, algorithm: str) -> int | None:
    """The pid of a live process running this cell, if any (its ``.running`` file)."""
    marker = RUNS / partition / algorithm / ".running"
    try:
        pid = int(marker.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def claim(partition: str, algorithm: str) -> bool:
    """Mark the cell as ours unless a live process runs it (a stale mark is taken over)."""
    out = RUNS / partition / algorithm
    out.mkdir(parents=True, exist_ok=True)
    if claimed_by(partition, algorithm) is not None:
        return False
    (out / ".running").write_text(str(os.getpid()))
    return True


def newest_checkpoint(partition: str, algorithm: str) -> Path | None:
    folder = RUNS / partition / algorithm / "checkpoints"
    return max(folder.glob("round_*.pt"), default=None) if folder.is_dir() else None


def progress_line(partition: str, algorithm: str) -> str | None:
    """``checkpoint of round N, best so far X% at round R`` for a started, unfinished cell
    (None for a finished or unstarted one)."""
    metrics = RUNS / partition / algorithm / "metrics.jsonl"
    checkpoint = newest_checkpoint(partition, algorithm)
    if summary(partition, algorithm) or checkpoint is None or not metrics.exists():
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    saved = int(checkpoint.stem.split("_")[1])
    rows = [r for r in rows if r["round"] <= saved and r.get("test_accuracy") is not None]
    if not rows:
        return f"checkpoint of round {saved}"
    top = max(rows, key=lambda r: r["test_accuracy"])
    return (
        f"checkpoint of round {saved}, best so far {100 * top['test_accuracy']:.2f}% "
        f"at round {top['round']}"
    )


def run_cell(
    partition: str, algorithm: str, threads: int, extra: list[str], deadline: float | None
) -> None:
    out = RUNS / partition / algorithm
    resume = ["resume=true"] if newest_checkpoint(partition, algorithm) else []
    print(f"[{time.strftime('%H:%M:%S')}] {partition}/{algorithm}", flush=True)
    setting = ALGORITHMS.get(algorithm) or VARIANTS[algorithm]
    overrides = ["+experiment=fmnist_dirichlet", *PARTITIONS[partition], *setting]
    note = out / "IN_PROGRESS.md"
    try:
        finished = run_fedtorch([*overrides, *resume, *extra], out, threads, deadline)
    except subprocess.CalledProcessError as error:
        print(f"  {record_failure(out, error.returncode)}; see {out / 'FAILED.md'}", flush=True)
        return
    if not finished:
        newest = newest_checkpoint(partition, algorithm).relative_to(REPO)
        checks = " --checks" if algorithm in VARIANTS else ""
        note.write_text(
            f"Stopped at --stop-at with a {progress_line(partition, algorithm)}.\n\n"
            f"`python experiments/niid_bench/run.py{checks} --only {partition}/{algorithm}` "
            "resumes from it and ends\nbit-identical to an uninterrupted run. Checkpoints are "
            "git-ignored; to carry the cell\nto another machine commit the newest:\n\n"
            f"    git add -f {newest}\n\nThis note goes when the cell finishes.\n"
        )
        print(f"  stopped; newest checkpoint {newest}", flush=True)
        return
    note.unlink(missing_ok=True)
    result = summary(partition, algorithm)
    print(
        f"  best {100 * result['best_accuracy']:.2f}% (round {result['best_round']}), "
        f"{result['wall_time_s']:.0f} s",
        flush=True,
    )


def best(partition: str, column: str) -> tuple[float | None, str]:
    """Best accuracy (%) of a column; FedProx takes its best mu. Returns (acc, note)."""
    if column != "fedprox":
        s = summary(partition, column)
        return (100 * s["best_accuracy"], "") if s else (None, "")
    done = {mu: summary(partition, f"fedprox_mu{mu}") for mu in MUS}
    done = {mu: s for mu, s in done.items() if s}
    if not done:
        return None, ""
    mu, s = max(done.items(), key=lambda kv: kv[1]["best_accuracy"])
    tried = len(done)
    note = f"mu={mu}" + ("" if tried == len(MUS) else f", {tried}/{len(MUS)} mu tried")
    return 100 * s["best_accuracy"], note


def table() -> str:
    """Markdown table: ours / published mean ± std per cell; gaps over GAP_POINTS in bold."""
    head = "| partition | " + " | ".join(f"{c} (ours / published)" for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for p in PARTITIONS:
        row = [PARTITION_NAMES[p]]
        for c in COLUMNS:
            acc, note = best(p, c)
            mean, std = PUBLISHED[p][c]
            published = f"{mean:.2f} ± {std:.2f}"
            if acc is None:
                failed = c != "fedprox" and failure(p, c)
                row.append(f"{'failed' if failed else '—'} / {published}")
                continue
            gap = acc - mean
            low, high = seed_range(mean, std)
            where = "in range" if low <= acc <= high else "out of range"
            flag = f" (**{gap:+.1f}**, {where})" if abs(gap) > GAP_POINTS else ""
            row.append(f"{acc:.2f} / {published}{flag}" + (f" [{note}]" if note else ""))
        lines.append("| " + " | ".join(row) + " |")
    done = sum(summary(p, a) is not None for p, a in cells())
    failed = (
        "; failed = the run failed, see its FAILED.md"
        if any(failure(*cell) for cell in cells())
        else ""
    )
    missing = "; — = not run yet" if done < len(cells()) else ""
    lines.append("")
    lines.append(
        f"{done} of {len(cells())} runs done{missing}{failed}. Ours: one seed;"
        " published: mean"
        f" ± standard deviation over the {PUBLISHED_SEEDS} seeds of Flower's reproduction. In"
        " range: ours lies within mean ± std·(n−1)/√n, as far as one of Flower's n runs can lie"
        " from their mean, so it could have been one of them; out of range: the spread of Flower's"
        " seeds cannot explain the gap (ours may still be an outlying seed)."
    )
    return "\n".join(lines)


def write_table() -> None:
    text = table()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "table.md").write_text(text + "\n")
    replace_block(HERE / "README.md", "table", text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="cells whose name contains one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (one per core)")
    parser.add_argument(
        "--stop-at",
        metavar="HH:MM",
        help="start no cell after this time; then interrupt running cells",
    )
    parser.add_argument("--checks", action="store_true", help="the side runs, not the grid")
    parser.add_argument("--list", action="store_true", help="list the cells and stop")
    parser.add_argument("--table", action="store_true", help="rebuild the table and stop")
    parser.add_argument("overrides", nargs="*", help="extra fedtorch overrides for every run")
    args = parser.parse_args()
    pool = CHECKS if args.checks else cells()
    todo = [(p, a) for p, a in pool if not args.only or any(o in f"{p}/{a}" for o in args.only)]
    if args.list:
        for p, a in todo:
            s, pid = summary(p, a), claimed_by(p, a)
            state = f"{100 * s['best_accuracy']:.2f}%" if s else "missing"
            partial = progress_line(p, a)
            state = f"started ({partial})" if partial else state
            state = failure(p, a) or state
            print(f"{p}/{a}: {state}" + (f" (running, pid {pid})" if pid and not s else ""))
        return
    if not args.table:
        deadline = stop_time(args.stop_at) if args.stop_at else None
        interruptible()
        run_grid(todo, args.jobs, args.threads, args.overrides, deadline)
    write_table()


def run_grid(
    todo: list[tuple[str, str]],
    jobs: int,
    threads: int,
    extra: list[str],
    deadline: float | None = None,
) -> None:
    """Run the missing cells of ``todo`` in order, ``jobs`` at a time, starting none after
    ``deadline``. A cell another invocation is running is skipped, so several invocations
    can share the grid."""
    queue, lock = iter(todo), threading.Lock()

    def worker() -> None:
        while deadline is None or time.time() < deadline:
            with lock:
                cell = next(
                    (c for c in queue if not summary(*c) and not failure(*c) and claim(*c)),
                    None,
                )
            if cell is None:
                return
            try:
                run_cell(*cell, threads, extra, deadline)
            finally:
                (RUNS / cell[0] / cell[1] / ".running").unlink(missing_ok=True)
            with lock:
                write_table()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(worker) for _ in range(jobs)]:
            future.result()


if __name__ == "__main__":
    main()
