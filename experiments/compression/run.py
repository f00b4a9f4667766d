"""Accuracy against bytes sent up, for every compressor, with and without error feedback.

Workloads (the same cohorts, batch order and initial weights in every arm of a workload:
they all derive from seed 0):

- ``mlp``: the quickstart: the 2NN MLP on Fashion-MNIST, 20 clients with Dir(0.5) label
  skew, 5 clients a round, one epoch of SGD (lr 0.05, batch 32), 100 rounds.
- ``cnn``: the NIID-Bench simple CNN on Fashion-MNIST, Dir(0.5), 10 clients all sampled,
  SGD lr 0.01 momentum 0.9, batch 64, **one** local epoch (NIID-Bench uses 10; one keeps
  a run at about 3 minutes here), 30 rounds.
- ``shakespeare``: the character LSTM on Shakespeare's speakers (``+experiment=shakespeare``:
  10 clients a round, SGD lr 1, batch 4), 100 rounds, evaluated every 10, for a subset
  of arms (a run costs about 15 minutes here, two side by side).

Arms: ``none`` (float32), and each lossy compressor with its default options (fp16, bf16,
int8 blocks of 256, QSGD s = 16 in buckets of 512, top-k 1%, rand-k 1%, scaled sign,
PowerSGD rank 4), each without (``NAME``) and with (``NAME_ef``) error feedback; rand-k
without error feedback also in its unbiased form (kept values scaled by P/k).

Reported per arm: total MiB sent up, the uplink compression ratio, final and best test
accuracy, and the bytes up needed to first reach the target accuracy, defined per
workload as 2 points below the uncompressed run's best accuracy. Plots:
``results/<workload>.png`` (test accuracy against cumulative MiB up, log scale).

Resumable run by run (finished runs are skipped; a stopped run resumes from its
checkpoint):

    python experiments/compression/run.py --jobs 2 [--workloads mlp cnn] [--only topk]
    python experiments/compression/run.py --table
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import interruptible, load_run, replace_block, run_fedtorch, stop_time  # noqa: E402

RESULTS = HERE / "results"
RUNS = RESULTS / "runs"
MIB = 2**20
TARGET_GAP = 0.02  # the target accuracy: this far below the uncompressed run's best

WORKLOADS = {
    "mlp": ["+experiment=quickstart", "rounds=100"],
    "cnn": ["+experiment=fmnist_dirichlet", "rounds=30", "client.epochs=1"],
    "shakespeare": ["+experiment=shakespeare", "rounds=100", "checkpoint.every=10"],
}
EF = "compression.error_feedback=true"
ARMS: dict[str, list[str]] = {"none": []}
for kind in ("fp16", "bf16", "int8", "qsgd", "topk", "randk", "signsgd", "powersgd"):
    ARMS[kind] = [f"compression={kind}"]
    if kind == "randk":
        ARMS["randk_unbiased"] = ["compression=randk", "compression.unbiased=true"]
    ARMS[f"{kind}_ef"] = [f"compression={kind}", EF]
SHAKESPEARE_ARMS = ("none", "topk", "topk_ef", "qsgd", "signsgd_ef", "powersgd_ef")


def arms_of(workload: str) -> list[str]:
    return list(SHAKESPEARE_ARMS) if workload == "shakespeare" else list(ARMS)


def run_one(workload: str, arm: str, threads: int, deadline: float | None) -> None:
    out = RUNS / workload / arm
    if load_run(out) is not None:
        return
    run_fedtorch([*WORKLOADS[workload], *ARMS[arm], "resume=auto"], out, threads, deadline)


def reach(rows: list[dict], target: float) -> tuple[int | None, int | None]:
    """(round, cumulative bytes up) of the first evaluation at or above ``target``."""
    for row in rows:
        accuracy = row.get("test_accuracy")
        if accuracy is not None and accuracy >= target:
            return row["round"], row["bytes_up"]
    return None, None


def table(workload: str) -> str:
    baseline = load_run(RUNS / workload / "none")
    target = baseline[0]["best_accuracy"] - TARGET_GAP if baseline else None
    base_bytes = reach(baseline[1], target)[1] if baseline else None
    head = (
        f"Target accuracy: {100 * target:.2f}% (2 points below the uncompressed best).\n\n"
        if target is not None
        else ""
    )
    lines = [
        "| compressor | error feedback | MiB up | ratio | final acc (%) | best acc (%) | "
        "round reaching target | MiB up to target | fewer bytes to target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms_of(workload):
        loaded = load_run(RUNS / workload / arm)
        name = arm.removesuffix("_ef")
        ef = "yes" if arm.endswith("_ef") else "no"
        if loaded is None:
            lines.append(f"| {name} | {ef} | — | — | — | — | — | — | — |")
            continue
        summary, rows = loaded
        ratio = summary.get("compression_ratio") or 1.0
        round_hit, bytes_hit = reach(rows, target) if target is not None else (None, None)
        fewer = f"{base_bytes / bytes_hit:.1f}x" if bytes_hit and base_bytes else "—"
        lines.append(
            f"| {name} | {ef} | {summary['bytes_up'] / MIB:.2f} | {ratio:.1f}x | "
            f"{100 * summary['final_accuracy']:.2f} | {100 * summary['best_accuracy']:.2f} | "
            f"{round_hit or 'not reached'} | "
            f"{f'{bytes_hit / MIB:.2f}' if bytes_hit else '—'} | {fewer} |"
        )
    return head + "\n".join(lines)


def plot(workload: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {}
    for arm in arms_of(workload):
        loaded = load_run(RUNS / workload / arm)
        if loaded is None:
            continue
        rows = [r for r in loaded[1] if r.get("test_accuracy") is not None]
        name = arm.removesuffix("_ef")
        color = colors.setdefault(name, f"C{len(colors) % 10}")
        ax.plot(
            [r["bytes_up"] / MIB for r in rows],
            [100 * r["test_accuracy"] for r in rows],
            color=color,
            linestyle="-" if arm.endswith("_ef") or arm == "none" else "--",
            label=arm,
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MiB sent up (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{workload}: accuracy against bytes up (solid: error feedback)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{workload}.png", dpi=110)
    plt.close(fig)


def write_tables() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for workload in WORKLOADS:
        text = table(workload)
        (RESULTS / f"{workload}.md").write_text(text + "\n")
        replace_block(HERE / "README.md", workload, text)
        if (RUNS / workload).is_dir():
            plot(workload)
        print(f"## {workload}\n{text}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--only", nargs="*", help="arms to run (exact names)")
    parser.add_argument("--stop-at", help="HH:MM: stop runs then (resumable), write tables")
    parser.add_argument("--table", action="store_true", help="only rewrite tables and plots")
    args = parser.parse_args()
    if not args.table:
        interruptible()
        deadline = stop_time(args.stop_at) if args.stop_at else None
        todo = [
            (w, a) for w in args.workloads for a in arms_of(w) if not args.only or a in args.only
        ]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_one, w, a, args.threads, deadline) for w, a in todo]:
                future.result()
    write_tables()


if __name__ == "__main__":
    main()
