"""Summarise a sweep: ``python -m fedtorch.report DIR``.

Finds every run under DIR (a folder holding ``summary.json``), groups runs by their
command-line overrides other than ``seed``, and prints one table row per setting with the
mean ± std over seeds of the final and best test accuracy. Writes ``report.md`` and
``report.png`` (mean test accuracy by round per setting, shaded ± std) into DIR.

Any sweeper's or launcher's folder works (basic, joblib, submitit: a numbered run folder
per job). Below the table come the runs that have no ``summary.json`` (a run that stopped
with an error, such as a diverged Optuna trial, or that was interrupted or is still
running) with the error line of their ``train.log``, and, for an Optuna sweep, the best
trial of its ``optimization_results.yaml`` and the run folder that holds it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

IGNORED_OVERRIDES = ("seed", "paths.output_dir", "hydra.run.dir", "hydra.sweep.dir")
_ERROR_LINE = "[ERROR] - error: "  # how train.log records the error that stopped a run


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


def _natural(path: Path) -> list[Any]:
    """Sort key putting run 2 before run 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def collect(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Runs under ``root`` grouped by setting: ``{setting: [{dir, summary, curve}, ...]}``."""
    runs = [
        {
            "dir": f.parent,
            "summary": json.loads(f.read_text()),
            "curve": _curve(f.parent),
            "overrides": _overrides(f.parent),
        }
        for f in sorted(root.rglob("summary.json"), key=_natural)
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


def unfinished(root: Path) -> list[tuple[Path, str]]:
    """Hydra job folders under ``root`` without ``summary.json``, each with why: the
    ``error:`` line of its ``train.log``, or a note that it was interrupted or still runs."""
    found = []
    for hydra_dir in sorted(root.rglob(".hydra"), key=_natural):
        run_dir = hydra_dir.parent
        if (run_dir / "summary.json").is_file():
            continue
        log_file = run_dir / "train.log"
        lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
        errors = [ln.split(_ERROR_LINE, 1)[1] for ln in lines if _ERROR_LINE in ln]
        found.append((run_dir, errors[-1] if errors else "no error logged: interrupted or running"))
    return found


def optuna_best(root: Path, groups: dict[str, list[dict[str, Any]]]) -> str | None:
    """The best trial of an Optuna sweep (``root/optimization_results.yaml``, written by
    Hydra's Optuna sweeper at the end of the search) and the run folder that holds it."""
    path = root / "optimization_results.yaml"
    if not path.is_file():
        return None
    results = yaml.safe_load(path.read_text()) or {}
    if "best_params" not in results:  # several objectives: a Pareto front
        return f"Optuna: {len(results.get('solutions', []))} Pareto-optimal trials, see {path}"
    params = results["best_params"] or {}
    wanted = {f"{key}={value}" for key, value in params.items()}
    holders = [
        run["dir"]
        for runs in groups.values()
        for run in runs
        if all(any(_same_override(w, o) for o in run["overrides"]) for w in wanted)
    ]
    where = f" (run {', '.join(str(d.relative_to(root)) for d in holders)})" if holders else ""
    setting = " ".join(sorted(wanted)) or "(no parameters)"
    return f"Optuna best: {results.get('best_value')} with {setting}{where}"


def _same_override(a: str, b: str) -> bool:
    """``key=value`` overrides equal, numbers compared as numbers (``1e-05`` = ``1.0e-05``)."""
    (key_a, _, value_a), (key_b, _, value_b) = a.partition("="), b.partition("=")
    if key_a != key_b.lstrip("+"):
        return False
    try:
        return math.isclose(float(value_a), float(value_b), rel_tol=1e-12)
    except ValueError:
        return value_a == value_b


def notes(root: Path, groups: dict[str, list[dict[str, Any]]]) -> str:
    """Lines under the table: runs without a summary, and Optuna's best trial."""
    lines = []
    missing = unfinished(root)
    if missing:
        lines.append(f"{len(missing)} run(s) without summary.json:")
        lines += [f"- {d.relative_to(root)}: {why}" for d, why in missing]
    best = optuna_best(root, groups)
    if best:
        lines.append(best)
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
    """``python -m fedtorch.report DIR``: print the table, write report.md and report.png."""
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
        for run_dir, why in unfinished(args.directory):
            print(f"  {run_dir}: {why}", file=sys.stderr)
        return 2
    text = table(groups)
    extra = notes(args.directory, groups)
    if extra:
        text += "\n\n" + extra
    print(text)
    (args.directory / "report.md").write_text(text + "\n")
    plot(groups, args.directory / "report.png")
    print(f"\nwrote {args.directory / 'report.md'} and {args.directory / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
