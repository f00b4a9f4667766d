"""The two engines on a transformer: one round of the ``shakespeare_lora`` preset's GPT
(2 layers of width 64), whole model and LoRA, sequential against vectorized, in seconds.

Each configuration trains round 1's clients, alternating the engines ``--repeats`` times in
one process (2 threads), so the host's drifting speed hits both alike.

    python experiments/speed/transformer_engines.py --repeats 3   # results/transformer_engines.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from fedtorch.config.build import build

HERE = Path(__file__).resolve().parent


def round_time(overrides: list[str]) -> float:
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    orch = build(cfg, HERE / "outputs" / "transformer_engines")
    t0 = time.perf_counter()
    orch._train_round(orch._start_round(1))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # PyTorch's "no batching rule" performance warning
    base = [
        "+experiment=shakespeare_lora",
        "model.n_layer=2",
        "model.n_embd=64",
        f"clients_per_round={args.clients}",
        "logger=quiet",
    ]
    results = {}
    for adapter in ("none", "lora"):
        times = {"sequential": [], "vectorized": []}
        for _ in range(args.repeats):
            for engine in times:
                times[engine].append(round_time([*base, f"adapter={adapter}", f"engine={engine}"]))
        medians = {e: statistics.median(t) for e, t in times.items()}
        results[adapter] = {
            **{f"{e}_s": round(m, 3) for e, m in medians.items()},
            "vectorized_time_ratio": round(medians["vectorized"] / medians["sequential"], 3),
            "all_s": {e: [round(v, 3) for v in t] for e, t in times.items()},
        }
    out = {"clients": args.clients, "repeats": args.repeats, "threads": 2, **results}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "transformer_engines.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
