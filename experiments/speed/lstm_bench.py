"""Local training of the Shakespeare character LSTM: fedtorch's client trainer against a
hand-written PyTorch loop on the same sequences, in sequences per second.

Both train the same clients (the cohorts of the first ``--rounds`` rounds of the
``shakespeare`` preset, seed 0, one after another) from
the same initial weights with SGD at lr 1, batches of 4 sequences in the same order
(fedtorch's batch schedule), one epoch; the check that they did the same work is that
their final weights agree. The two alternate, ``--repeats`` times each, in one process and
one thread, so the host's drifting speed hits both alike. Then one step of 4 clients under
``vmap`` (what the vectorized engine would run) against their 4 steps one after another.

    python experiments/speed/lstm_bench.py --rounds 4 --repeats 3   # writes results/lstm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from fedtorch.config.build import build
from fedtorch.results import ClientTask
from fedtorch.server.sampling import sample_clients

HERE = Path(__file__).resolve().parent


def hand_written(model, state, x, y, schedules, lr: float) -> dict:
    """Per client: load the weights, plain SGD over the given batches, masked CE (pad 0)."""
    for batches, sizes in schedules:
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for row, size in zip(batches, sizes):
            b = row[:size]
            logits = model(x[b])
            loss = F.cross_entropy(logits.flatten(0, 1), y[b].flatten(), ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def vmap_against_loop(model, x, y, clients: int = 4, repeats: int = 3) -> dict:
    """One step of ``clients`` clients: vmap(grad) over stacked weights (what the vectorized
    engine would do) against the clients' steps one after another."""
    import warnings

    from torch.func import functional_call, grad, vmap

    params = {
        k: v.detach().unsqueeze(0).repeat(clients, *[1] * v.dim())
        for k, v in model.named_parameters()
    }
    xs, ys = x[: 4 * clients].view(clients, 4, -1), y[: 4 * clients].view(clients, 4, -1)

    def loss(p, xb, yb):
        logits = functional_call(model, p, (xb,))
        return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), ignore_index=0)

    step = vmap(grad(loss))
    times = {"vmap": [], "one after another": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "no batching rule" performance warning
        step(params, xs, ys)
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(params, xs, ys)
            times["vmap"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for k in range(clients):
                model.zero_grad()
                loss(dict(model.named_parameters()), xs[k], ys[k]).backward()
            times["one after another"].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "clients": clients,
        **{f"{k}_s": round(v, 3) for k, v in medians.items()},
        "vmap_time_ratio": medians["vmap"] / medians["one after another"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="cohorts of rounds 1..N")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = ["+experiment=shakespeare", f"data.root={args.data_root}", "logger=quiet"]
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    orch = build(cfg, HERE / "outputs" / "lstm_bench")
    trainer, shards = orch.trainer, orch.shards
    work = [
        (r, c)
        for r in range(1, args.rounds + 1)
        for c in sample_clients(len(shards), cfg.clients_per_round, cfg.seed, r)
    ]
    schedules = [trainer.schedule(c, shards[c], r) for r, c in work]
    sequences = sum(len(shards[c]) for _, c in work)
    state = {k: v.clone() for k, v in orch.global_state.items()}
    delta = torch.empty_like(orch.global_vector)
    reference_model = type(trainer.model)()
    reference_model.load_state_dict(state)

    def fedtorch_loop() -> torch.Tensor:
        for r, c in work:
            trainer.train(ClientTask(c), shards[c], state, orch.global_vector, r, delta)
        return delta + orch.global_vector  # the last client's weights

    times = {"hand-written": [], "fedtorch": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = fedtorch_loop()
        times["fedtorch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = hand_written(
            reference_model,
            state,
            trainer.train_x,
            trainer.train_y,
            schedules,
            cfg.client.optimizer.lr,
        )
        times["hand-written"].append(time.perf_counter() - t0)
    gap = float((ours - orch.layout.flatten(theirs)).abs().max())
    result = {
        "clients": len(work),
        "sequences": sequences,
        "steps": sum(len(s[1]) for s in schedules),
        "repeats": args.repeats,
        "max_weight_gap": gap,
        **{
            name: {
                "median_s": statistics.median(t),
                "sequences_per_s": sequences / statistics.median(t),
                "all_s": [round(v, 3) for v in t],
            }
            for name, t in times.items()
        },
    }
    result["fedtorch_time_ratio"] = (
        result["fedtorch"]["median_s"] / result["hand-written"]["median_s"]
    )
    result["vmap_step"] = vmap_against_loop(reference_model, trainer.train_x, trainer.train_y)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "lstm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
