"""Build one fedtorch run, then train it, and print its memory as one JSON line.

    python measure.py RUN_DIR override [override ...]

Run by run.py in a fresh process per cell, with PYTHONPATH choosing which source tree is
measured. Reads the kernel's own counters: VmRSS after build (the baseline: PyTorch
runtime, data, model and global weights), then resets VmHWM (``/proc/self/clear_refs``)
so that the peak afterwards is the peak of training itself (the round, its aggregation,
evaluation and the final save).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from fedtorch.config.build import build


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def main(run_dir: str, overrides: list[str]) -> None:
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    orchestrator = build(cfg, Path(run_dir))
    build_peak = status_mb("VmHWM")
    baseline = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    start = time.perf_counter()
    summary = orchestrator.run()
    seconds = time.perf_counter() - start
    train_peak = status_mb("VmHWM")
    model_mb = summary["num_parameters"] * 4 / 2**20
    print(
        json.dumps(
            {
                "baseline_mb": baseline,
                "build_peak_mb": build_peak,
                "train_peak_mb": train_peak,
                "process_peak_mb": max(build_peak, train_peak),
                "model_mb": model_mb,
                "above_baseline_models": (train_peak - baseline) / model_mb,
                "clients": orchestrator.logger.history[-1]["clients"],
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
