"""The reference: a minimal hand-written FedAvg loop in plain PyTorch, no framework.

Reads a workload spec written by bench.py (data tensors, client index lists, the cohort of
every round, initial weights, hyperparameters), trains, and prints one JSON line with the
set-up time (process start to the start of round 1), the per-round wall times (test
evaluation included) and the test accuracy after every round. bench.py measures memory
from outside.

    python reference.py SPEC.pt
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from memory import process_age_s


def local_train(model, spec: dict, idx: torch.Tensor, seed: int) -> None:
    """Local SGD of one client from the model's current weights, batches in `seed`'s order."""
    x, y = spec["train_x"], spec["train_y"]
    batch = spec["batch_size"]
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(spec["epochs"]):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(order), batch):
            b = order[start : start + batch]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_accuracy(model, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Fraction of the test set the model classifies correctly (chunks of 1000)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_x), 1000):
            pred = model(test_x[start : start + 1000]).argmax(1)
            correct += int((pred == test_y[start : start + 1000]).sum())
    model.train()
    return correct / len(test_x)


def main(spec_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    model = spec["model_factory"]()
    global_state = {k: v.clone() for k, v in spec["init_state"].items()}

    setup_s = process_age_s()
    round_times, accuracies = [], []
    for r, cohort in enumerate(spec["cohorts"], start=1):
        t0 = time.perf_counter()
        total = sum(len(spec["shards"][c]) for c in cohort)
        # Weighted sum in cohort order, in float32: state_0 * w_0 + state_1 * w_1 + ...
        # (the same arithmetic, term by term, as Flower's FedAvg on numpy arrays).
        new_state = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
        for c in cohort:
            idx = spec["shards"][c]
            model.load_state_dict(global_state)
            local_train(model, spec, idx, spec["batch_seeds"][(r, c)])
            weight = len(idx) / total
            for k, v in model.state_dict().items():
                new_state[k] += weight * v
        global_state = new_state
        model.load_state_dict(global_state)
        accuracies.append(test_accuracy(model, spec["test_x"], spec["test_y"]))
        round_times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "setup_s": setup_s,
                "round_times": round_times,
                "accuracies": accuracies,
                "final_accuracy": accuracies[-1],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
