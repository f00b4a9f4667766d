"""What reading through DataLoaders costs: data.in_memory=false against the in-memory path.

Runs the same Fashion-MNIST job (real data, 20 clients Dir(0.5), 5 a round, 1 local epoch,
B=32, evaluation on the 10k test images every round) with the data in memory and through
DataLoaders with 0, 1 and 2 worker processes, interleaved, ``--repeats`` times, for the
quickstart MLP and the NIID-Bench CNN. Reports the median seconds a round (round 1, where
the workers start, left out) and checks that every arm gives the same test accuracy in every
round (the DataLoader path draws the in-memory batches).

    python experiments/dataloader/bench.py            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_run, replace_block, run_fedtorch  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE = [
    "+experiment=quickstart",
    "dataset=fashion_mnist",
    "data.download=false",
    "seed=0",
]
MODELS = {"mlp": ["model=mlp"], "cnn": ["model=simple_cnn"]}
ARMS = {
    "in memory": ["data.in_memory=true"],
    "DataLoader, 0 workers": ["data.in_memory=false", "data.num_workers=0"],
    "DataLoader, 1 worker": ["data.in_memory=false", "data.num_workers=1"],
    "DataLoader, 2 workers": ["data.in_memory=false", "data.num_workers=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch_threads of every run")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dataloader.json")
    args = parser.parse_args()

    times: dict[str, dict[str, list[float]]] = {m: {a: [] for a in ARMS} for m in args.models}
    accuracy: dict[str, dict[str, list[float]]] = {m: {} for m in args.models}
    scratch = Path(tempfile.mkdtemp(prefix="dataloader-bench-"))
    try:
        for repeat in range(args.repeats):
            for model in args.models:
                for arm, overrides in ARMS.items():
                    name = "".join(ch for ch in arm if ch.isalnum())
                    out = scratch / f"{model}-{len(times[model][arm])}-{name}"
                    cmd = [*BASE, *MODELS[model], *overrides, f"rounds={args.rounds}"]
                    run_fedtorch(cmd, out, threads=args.threads)
                    _, rows = load_run(out)
                    per_round = [r["round_time_s"] for r in rows[1:]]
                    times[model][arm].append(statistics.median(per_round))
                    accs = [r["test_accuracy"] for r in rows]
                    if accuracy[model].setdefault("reference", accs) != accs:
                        raise SystemExit(f"{model}/{arm}: accuracy per round differs: {accs}")
                    shutil.rmtree(out)
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "command": "python experiments/dataloader/bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "threads": args.threads,
        "median_round_s": {
            m: {a: statistics.median(v) for a, v in arms.items()} for m, arms in times.items()
        },
        "runs_round_s": times,
        "final_accuracy": {m: acc["reference"][-1] for m, acc in accuracy.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    for readme in (HERE / "README.md", HERE.parents[1] / "README.md"):
        replace_block(readme, "dataloader", table)


def render(result: dict) -> str:
    lines = [
        "| model | reading | s / round (median) | vs in memory |",
        "|---|---|---:|---:|",
    ]
    for model, arms in result["median_round_s"].items():
        base = arms["in memory"]
        for arm, seconds in arms.items():
            lines.append(f"| {model} | {arm} | {seconds:.3f} | {seconds / base:.2f}x |")
    accs = ", ".join(f"{m} {a:.4f}" for m, a in result["final_accuracy"].items())
    lines.append("")
    lines.append(
        f"{result['rounds']} rounds, {result['repeats']} interleaved repeats, "
        f"torch_threads={result['threads']}; every arm had the same test accuracy in every "
        f"round (final: {accs})."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
