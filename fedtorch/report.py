"""Summarise a sweep: ``python -m fedtorch.report DIR``.

Finds every run under DIR (a folder holding ``summary.json``), groups runs by their
command-line overrides other than ``seed``, and prints one table row per setting with the
mean ± std over seeds of the final and best test accuracy. Writes ``report.md`` and
``report.png`` (mean test accuracy by round per setting, shaded ± std) into DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

IGNORED_OVERRIDES = ("seed", "paths.output_dir", "hydra.run.dir", "hydra.sweep.dir")


def _overrides(run_dir: Path) -> frozenset[str]:
    """The run's command-line overrides minus seed and output paths."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return frozenset({run_dir.name})
    overrides = yaml.safe_load(overrides_file.read_text()) or []
    return frozenset(
        o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in IGNORED_OVERRIDES
    )


def _curve(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    curve: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("test_accuracy") is not None:
                curve[row["round"]] = row["test_accuracy"]
    return curve


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    clean = [v for v in values if v is not None]
    if not clean:
        return float("nan"), float("nan")
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def collect(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Runs under ``root`` grouped by setting: ``{setting: [{dir, summary, curve}, ...]}``."""
    runs = [
        {
            "dir": f.parent,
            "summary": json.loads(f.read_text()),
            "curve": _curve(f.parent),
            "overrides": _overrides(f.parent),
        }
        for f in sorted(root.rglob("summary.json"))
    ]
    # Overrides shared by every run say nothing about the difference between settings.
    common = frozenset.intersection(*(r["overrides"] for r in runs)) if runs else frozenset()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[" ".join(sorted(run["overrides"] - common)) or "(all runs)"].append(run)
    return dict(groups)


def table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table: setting, seeds, final and best accuracy (mean ± std, in %)."""
    lines = [
        "| setting | runs | final accuracy (%) | best accuracy (%) | rounds |",
        "|---|---|---|---|---|",
    ]
    for setting, runs in groups.items():
        final = _mean_std([r["summary"].get("final_accuracy") for r in runs])
        best = _mean_std([r["summary"].get("best_accuracy") for r in runs])
        rounds = _mean_std([r["summary"].get("rounds_completed") for r in runs])
        lines.append(
            f"| {setting} | {len(runs)} | {100 * final[0]:.2f} ± {100 * final[1]:.2f} "
            f"| {100 * best[0]:.2f} ± {100 * best[1]:.2f} | {rounds[0]:.0f} |"
        )
    return "\n".join(lines)


def plot(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Mean test accuracy by round for each setting, shaded ± one std over runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for setting, runs in groups.items():
        rounds = sorted(set().union(*(r["curve"].keys() for r in runs)))
        if not rounds:
            continue
        stats = [_mean_std([r["curve"].get(t) for r in runs]) for t in rounds]
        mean = [m for m, _ in stats]
        std = [s for _, s in stats]
        (line,) = ax.plot(rounds, mean, label=setting)
        ax.fill_between(
            rounds,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set(xlabel="round", ylabel="test accuracy", title="test accuracy (mean ± std over runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedtorch.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("directory", type=Path, help="a sweep folder (or any folder of runs)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a folder", file=sys.stderr)
        return 2
    groups = collect(args.directory)
    if not groups:
        print(f"error: no runs (summary.json) found under {args.directory}", file=sys.stderr)
        return 2
    text = table(groups)
    print(text)
    (args.directory / "report.md").write_text(text + "\n")
    plot(groups, args.directory / "report.png")
    print(f"\nwrote {args.directory / 'report.md'} and {args.directory / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
