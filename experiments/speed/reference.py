"""The reference: a minimal hand-written FedAvg loop in plain PyTorch, no framework.

Reads a workload spec written by bench.py (data tensors, client index lists, the cohort of
every round, initial weights, hyperparameters), trains, and prints one JSON line with the
per-round wall times, the final test accuracy and the peak RSS.

    python reference.py SPEC.pt
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from memory import peak_rss_mb


def main(spec_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    x, y = spec["train_x"], spec["train_y"]
    test_x, test_y = spec["test_x"], spec["test_y"]
    model = spec["model_factory"]()
    global_state = {k: v.clone() for k, v in spec["init_state"].items()}
    lr, batch, epochs = spec["lr"], spec["batch_size"], spec["epochs"]

    round_times = []
    for r, cohort in enumerate(spec["cohorts"], start=1):
        t0 = time.perf_counter()
        total = sum(len(spec["shards"][c]) for c in cohort)
        new_state = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
        for c in cohort:
            idx = spec["shards"][c]
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(spec["batch_seeds"][(r, c)])
            for _ in range(epochs):
                order = idx[torch.randperm(len(idx), generator=gen)]
                for start in range(0, len(order), batch):
                    b = order[start : start + batch]
                    loss = F.cross_entropy(model(x[b]), y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            weight = len(idx) / total
            for k, v in model.state_dict().items():
                new_state[k] += weight * v
        global_state = new_state
        model.load_state_dict(global_state)
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(test_x), 1000):
                pred = model(test_x[start : start + 1000]).argmax(1)
                correct += int((pred == test_y[start : start + 1000]).sum())
        model.train()
        accuracy = correct / len(test_x)
        round_times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "round_times": round_times,
                "final_accuracy": accuracy,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
