"""Run one fedtorch job in this process and print one JSON line (for bench.py).

python fedtorch_run.py RUN_DIR override [override ...]
"""

from __future__ import annotations

import json
import statistics
import sys

from hydra import compose, initialize_config_module
from memory import peak_rss_mb

from fedtorch.build import build


def main(run_dir: str, overrides: list[str]) -> None:
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    orchestrator = build(cfg, run_dir)
    summary = orchestrator.run()
    rows = orchestrator.logger.history
    print(
        json.dumps(
            {
                "round_times": [r["round_time_s"] for r in rows],
                "median_round_s": statistics.median(r["round_time_s"] for r in rows),
                "final_accuracy": summary["final_accuracy"],
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
