"""Accuracy against privacy on Fashion-MNIST: DP-FedAvg for several noise multipliers,
with and without secure aggregation.

Every cell is ``+experiment=fmnist_private`` (100 clients, Dir(0.5), 50 sampled a round,
q = 0.5, 30 rounds, MLP 784-64-10, clip norm 1, central DP at delta = 1e-5) with one noise
multiplier z; ``nodp`` trains without DP (secure aggregation then clips coordinates to
+-1, which never binds here: the count is in the metrics). Cohorts are Poisson-sampled
and accounted so (the DP default); ``z1-fixed`` draws exactly 50 clients a round and is
accounted for sampling without replacement (replace-one). Resumable; writes
``results/table.md``, ``results/privacy.png`` and the table in README.md.

    python experiments/privacy/run.py [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import load_run, replace_block, run_fedtorch  # noqa: E402

RUNS = HERE / "results" / "runs"
NOISE = {"nodp": None, "z0.5": 0.5, "z1": 1.0, "z2": 2.0, "z4": 4.0, "z1-fixed": 1.0}
SECAGG = {"plain": [], "secagg": ["secure_aggregation.enabled=true"]}
ONLY_PLAIN = {"z1-fixed"}  # the sampling comparison needs no secure-aggregation twin


def cells() -> list[tuple[str, str]]:
    return [(n, a) for n in NOISE for a in SECAGG if not (n in ONLY_PLAIN and a != "plain")]


def overrides(noise: str, agg: str) -> list[str]:
    z = NOISE[noise]
    dp = ["privacy=none"] if z is None else [f"privacy.noise_multiplier={z}"]
    if z is None and agg == "secagg":
        dp.append("secure_aggregation.value_range=1.0")
    if noise.endswith("-fixed"):
        dp.append("privacy.sampling=fixed")
    return ["+experiment=fmnist_private", *dp, *SECAGG[agg]]


def table() -> str:
    lines = [
        "| noise multiplier z | aggregation | sampling, accounting | epsilon (delta=1e-5) "
        "| final acc (%) | best acc (%) | round time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for noise, agg in cells():
        loaded = load_run(RUNS / f"{noise}-{agg}")
        z = "no DP" if NOISE[noise] is None else f"{NOISE[noise]:g}"
        if loaded is None:
            lines.append(f"| {z} | {agg} | — | — | — | — | — |")
            continue
        summary, rows = loaded
        eps = summary.get("epsilon")
        eps_text = "∞" if eps is None else f"{eps:.2f}"
        accounting = "—"
        if eps is not None:
            accounting = f"{summary['client_sampling']}: {summary['accounting']}"
        per_round = sum(r["round_time_s"] for r in rows) / len(rows)
        lines.append(
            f"| {z} | {agg} | {accounting} | {eps_text} | "
            f"{100 * summary['final_accuracy']:.2f} | {100 * summary['best_accuracy']:.2f} "
            f"| {per_round:.2f} |"
        )
    return "\n".join(lines)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for agg, marker in (("plain", "o"), ("secagg", "x")):
        points = []
        for noise in NOISE:
            if noise in ONLY_PLAIN:
                continue
            loaded = load_run(RUNS / f"{noise}-{agg}")
            if loaded and loaded[0].get("epsilon") is not None:
                points.append((loaded[0]["epsilon"], 100 * loaded[0]["final_accuracy"]))
        if points:
            xs, ys = zip(*sorted(points))
            left.plot(xs, ys, marker=marker, label=agg)
    baseline = load_run(RUNS / "nodp-plain")
    if baseline:
        left.axhline(100 * baseline[0]["final_accuracy"], ls="--", c="gray", label="no DP")
    left.set(xscale="log", xlabel="epsilon (delta = 1e-5)", ylabel="final test accuracy (%)")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_title("accuracy vs privacy (30 rounds)")
    for noise in NOISE:
        loaded = load_run(RUNS / f"{noise}-plain")
        if loaded:
            rows = loaded[1]
            right.plot(
                [r["round"] for r in rows], [100 * r["test_accuracy"] for r in rows], label=noise
            )
    right.set(xlabel="round", ylabel="test accuracy (%)", title="training curves (plain)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "results" / "privacy.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args()
    for noise, agg in cells():
        out = RUNS / f"{noise}-{agg}"
        if load_run(out) is None:
            run_fedtorch(overrides(noise, agg), out, args.threads)
    text = table()
    (HERE / "results" / "table.md").write_text(text + "\n")
    replace_block(HERE / "README.md", "table", text)
    plot()
    print(text)


if __name__ == "__main__":
    main()
