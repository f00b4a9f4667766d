"""Round time of the NIID-Bench setting with conv weights channels_last against contiguous.

Runs ``+experiment=fmnist_dirichlet`` (simple CNN, 10 clients, B = 64, real Fashion-MNIST)
for a few rounds of one local epoch with ``memory_format=channels_last`` and
``memory_format=contiguous``, alternating, one process at a time, and reports the median
round time of each and their ratio, plus the final accuracy of both (equal up to float
rounding). Writes ``memory_format.json`` and the block in README.md.

    python experiments/speed/memory_format.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import replace_block, run_fedtorch  # noqa: E402

LAYOUTS = ("channels_last", "contiguous")


def one_run(layout: str, rounds: int, threads: int, extra: list[str]) -> dict:
    """Round times (first round dropped as warm-up) and final accuracy of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "+experiment=fmnist_dirichlet",
            "client.epochs=1",
            f"rounds={rounds}",
            "checkpoint.every=0",
            f"memory_format={layout}",
            *extra,
        ]
        run_fedtorch(overrides, Path(tmp) / "run", threads)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").open()]
    return {
        "round_times_s": [r["round_time_s"] for r in rows[1:]],
        "final_accuracy": rows[-1]["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per layout, interleaved")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (first is warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("overrides", nargs="*", help="extra fedtorch overrides")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    for _ in range(args.repeats):
        for layout in LAYOUTS:
            runs[layout].append(one_run(layout, args.rounds, args.threads, args.overrides))
    median = {
        layout: statistics.median(t for r in runs[layout] for t in r["round_times_s"])
        for layout in LAYOUTS
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "setting": f"fmnist_dirichlet, E=1, {args.rounds} rounds, {args.repeats} runs per layout",
        "median_round_time_s": median,
        "speedup": median["contiguous"] / median["channels_last"],
        "final_accuracy": {
            layout: [r["final_accuracy"] for r in runs[layout]] for layout in LAYOUTS
        },
        "runs": runs,
    }
    (HERE / "memory_format.json").write_text(json.dumps(result, indent=2) + "\n")
    acc = result["final_accuracy"]
    text = "\n".join(
        [
            f"{result['date']}; {result['machine']}; {result['setting']}, interleaved.",
            "",
            "| memory_format | median round time | final accuracy (each run) |",
            "|---|---|---|",
            *(
                f"| {layout} | {median[layout]:.2f} s | "
                + ", ".join(f"{100 * a:.2f}%" for a in acc[layout])
                + " |"
                for layout in LAYOUTS
            ),
            "",
            f"channels_last is **{result['speedup']:.2f}x** as fast a round.",
        ]
    )
    replace_block(HERE / "README.md", "memory_format", text)
    print(text)


if __name__ == "__main__":
    main()
