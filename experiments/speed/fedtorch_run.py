"""Run one fedtorch job in this process and print one JSON line (for bench.py).

The line holds the set-up time (process start to the start of round 1), the per-round wall
times and the test accuracy after every round; bench.py measures memory from outside.

python fedtorch_run.py RUN_DIR override [override ...]
"""

from __future__ import annotations

import json
import sys

from hydra import compose, initialize_config_module
from memory import process_age_s

from fedtorch.config.build import build


def main(run_dir: str, overrides: list[str]) -> None:
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    orchestrator = build(cfg, run_dir)
    run_called_at = process_age_s()
    summary = orchestrator.run()
    rows = orchestrator.logger.history
    # elapsed_s counts from run()'s start to the end of a round: what precedes round 1's
    # own clock inside run() is set-up too.
    before_round_1 = rows[0]["elapsed_s"] - rows[0]["round_time_s"]
    print(
        json.dumps(
            {
                "setup_s": run_called_at + before_round_1,
                "round_times": [r["round_time_s"] for r in rows],
                "accuracies": [r["test_accuracy"] for r in rows if "test_accuracy" in r],
                "final_accuracy": summary["final_accuracy"],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
