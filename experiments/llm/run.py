"""Federated fine-tuning of the pretrained GPT on the other half of the plays: full model
against LoRA adapters, at equal rounds.

Every arm starts from ``results/pretrained/model.pt`` (``pretrain.py``) and trains on the
speaker clients of the 18 plays it did not see (``data.plays``), with the
``shakespeare_lora`` preset: 10 clients a round (the same cohorts in every arm), one local
epoch with batches of 16 sequences of 80 characters, sequential engine; clients train
with Adam (``client=adam``, moments reset every round, as FedIT and OpenFedLLM's clients
do): with SGD the test loss moved by less than 0.003 in 15 rounds at every learning rate
tried (results/sgd_tuning.md).

Arms: full-model FedAvg; LoRA (all linear layers but the output) FedAvg at r = 4 and 16
(alpha = 2r); LoRA r = 16 with exact aggregation (FedEx-LoRA); LoRA r = 16 with FedAdam;
and local-only LoRA r = 16 (``key_rules`` keep each client's adapter local, never
averaged; evaluated per client on its own test rows, ``eval_local``).

The client learning rate is tuned first, separately for the full model and for LoRA, on
the test loss after 15 rounds (there is no separate validation split; the mean training
loss of rounds 11-15 is recorded beside it in results/tuning.md); FedAdam's server
learning rate likewise with the LoRA client rate. The table reports, at
the last round: test perplexity and token accuracy of the global model (local-only: of
each client's own model, pooled), bytes up and down per round (mean over the run; a LoRA
client downloads the frozen base the first time it is sampled), the median seconds of a
round without evaluation, and the peak resident memory of the run's process.

Resumable run by run (checkpoints every 10 rounds; finished runs are skipped):

    python experiments/llm/run.py                    # tuning, then every arm
    python experiments/llm/run.py --jobs 2 --stop-at 12:10
    python experiments/llm/run.py --table
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import REPO, interruptible, replace_block, run_fedtorch, stop_time  # noqa: E402

RESULTS = HERE / "results"
RUNS = RESULTS / "runs"
PRETRAINED = RESULTS / "pretrained"
ROUNDS, EVAL_EVERY = 150, 25
TUNE_ROUNDS, TUNE_TAIL = 15, 5
CLIENT_LRS = {"full": (1e-4, 3e-4, 1e-3), "lora": (3e-4, 1e-3, 3e-3)}
SERVER_LRS = (0.001, 0.003, 0.01)

LORA4 = ["adapter.r=4", "adapter.alpha=8"]
LOCAL = ["key_rules=[{pattern: lora_, rule: local}]", "eval_local=true"]
# name -> (label, tuning group of the client lr, overrides)
ARMS = {
    "full": ("full model, FedAvg", "full", ["adapter=none"]),
    "lora4": ("LoRA r=4, FedAvg", "lora", LORA4),
    "lora16": ("LoRA r=16, FedAvg", "lora", []),
    "lora16_exact": ("LoRA r=16, FedAvg, exact", "lora", ["adapter.aggregation=exact"]),
    "lora16_fedadam": ("LoRA r=16, FedAdam", "lora", ["strategy=fedadam"]),
    "lora16_local": ("LoRA r=16, local only", "lora", LOCAL),
}


def base_overrides() -> list[str]:
    plays = json.loads((PRETRAINED / "pretrain.json").read_text())["federated_plays"]
    return [
        "+experiment=shakespeare_lora",
        f"init_from={(PRETRAINED / 'model.pt').relative_to(REPO)}",
        f"data.plays=[{','.join(plays)}]",
        "client=adam",
        "checkpoint.every=10",
    ]


def tuning_runs() -> dict[str, list[str]]:
    runs = {}
    for full_lr, lora_lr in zip(CLIENT_LRS["full"], CLIENT_LRS["lora"]):
        runs[f"tune_full_lr{full_lr}"] = ["adapter=none", f"client.optimizer.lr={full_lr}"]
        runs[f"tune_lora_lr{lora_lr}"] = [f"client.optimizer.lr={lora_lr}"]
    return runs


def rows(name: str) -> list[dict]:
    path = RUNS / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def summary(name: str, rounds: int) -> dict | None:
    path = RUNS / name / "summary.json"
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    return done if done["rounds_completed"] >= rounds else None


def tail_loss(name: str) -> float | None:
    """Mean training loss of the last TUNE_TAIL rounds of a finished tuning run."""
    if summary(name, TUNE_ROUNDS) is None:
        return None
    return statistics.fmean(r["train_loss"] for r in rows(name)[-TUNE_TAIL:])


def tune_loss(name: str) -> float | None:
    """Test loss at the last round of a finished tuning run (the selection criterion)."""
    done = summary(name, TUNE_ROUNDS)
    return None if done is None else done["final_loss"]


def best_client_lr(group: str) -> float | None:
    losses = {lr: tune_loss(f"tune_{group}_lr{lr}") for lr in CLIENT_LRS[group]}
    if any(v is None for v in losses.values()):
        return None
    return min(losses, key=lambda lr: losses[lr])


def fedadam_run(client_lr: float, server_lr: float) -> str:
    return f"tune_fedadam_lr{client_lr}_slr{server_lr}"


def best_server_lr() -> float | None:
    client_lr = best_client_lr("lora")
    losses = {lr: tune_loss(fedadam_run(client_lr, lr)) for lr in SERVER_LRS}
    if any(v is None for v in losses.values()):
        return None
    return min(losses, key=lambda lr: losses[lr])


def plan() -> list[tuple[str, list[str], int, int]]:
    """(name, overrides, rounds, eval_every) of every run whose settings are known now."""
    out = [(n, o, TUNE_ROUNDS, TUNE_ROUNDS) for n, o in tuning_runs().items()]
    lora_lr = best_client_lr("lora")
    if lora_lr is not None:
        for slr in SERVER_LRS:
            adam = ["strategy=fedadam", f"strategy.server_lr={slr}"]
            lr = f"client.optimizer.lr={lora_lr}"
            out.append((fedadam_run(lora_lr, slr), [lr, *adam], TUNE_ROUNDS, TUNE_ROUNDS))
    server_lr = best_server_lr()
    for name, (_, group, overrides) in ARMS.items():
        lr = best_client_lr(group)
        if lr is None or (name == "lora16_fedadam" and server_lr is None):
            continue
        extra = [f"strategy.server_lr={server_lr}"] if name == "lora16_fedadam" else []
        out.append((name, [*overrides, f"client.optimizer.lr={lr}", *extra], ROUNDS, EVAL_EVERY))
    return out


def run_one(name: str, overrides: list[str], rounds: int, every: int, threads: int, deadline):
    out = RUNS / name
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("round_*.pt"))
    args = [*base_overrides(), *overrides, f"rounds={rounds}", f"eval_every={every}"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
    try:
        return run_fedtorch([*args, *(["resume=true"] if resume else [])], out, threads, deadline)
    except subprocess.CalledProcessError as error:
        (out / "FAILED.md").write_text(f"exit status {error.returncode}; see train.log\n")
        print(f"  {name} failed (exit {error.returncode})", flush=True)
        return False


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table() -> str:
    lines = [
        "| arm | client lr | trainable params | test perplexity | token accuracy | "
        "MiB up / round | MiB down / round | s / round | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (label, group, _) in ARMS.items():
        done = summary(name, ROUNDS)
        lr = best_client_lr(group)
        if done is None:
            lines.append(f"| {label} | {lr or '—'} | — | — | — | — | — | — | — |")
            continue
        last = [r for r in rows(name) if r.get("test_loss") is not None][-1]
        prefix = "local_test" if name.endswith("_local") else "test"
        loss, acc = last[f"{prefix}_loss"], last[f"{prefix}_accuracy"]
        pace = statistics.median(r["round_time_s"] for r in rows(name) if "test_loss" not in r)
        lr_text = f"{lr}" + (f" (server {best_server_lr()})" if name == "lora16_fedadam" else "")
        lines.append(
            f"| {label} | {lr_text} | {done['trainable_parameters']:,} | {math.exp(loss):.3f} | "
            f"{100 * acc:.2f}% | {mib(done['bytes_up'] / ROUNDS)} | "
            f"{mib(done['bytes_down'] / ROUNDS)} | {pace:.1f} | {done['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(
        f"At round {ROUNDS}, seed 0, 10 clients a round (583 clients in all). Before any "
        f"federated round the pretrained model scores {baseline_text()} on the same test "
        "rows. s/round: median of the rounds without evaluation, one thread, two runs at a "
        "time on a 2-core CPU (the last arm alone for its last rounds). Peak RSS: the run "
        "process's VmHWM (`peak_rss_mb` in summary.json)."
    )
    return "\n".join(lines)


def baseline() -> dict | None:
    """The pretrained model's test loss and accuracy (results/baseline.json), if measured."""
    path = RESULTS / "baseline.json"
    return json.loads(path.read_text()) if path.exists() else None


def baseline_text() -> str:
    b = baseline()
    if b is None:
        return "(not measured yet)"
    perplexity, accuracy = math.exp(b["test_loss"]), 100 * b["test_accuracy"]
    return f"perplexity {perplexity:.3f}, token accuracy {accuracy:.2f}%"


def measure_baseline() -> None:
    """Test loss and accuracy of the pretrained model on the federated plays' test rows."""
    path = RESULTS / "baseline.json"
    if path.exists():
        return
    import tempfile

    from hydra import compose, initialize_config_module

    from fedtorch.config.build import build
    from fedtorch.server.evaluation import evaluate

    overrides = [*base_overrides(), "adapter=none", "logger=quiet", "torch_threads=2"]
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        orch = build(cfg, Path(tmp))
        data = orch.data
        loss, acc = evaluate(orch.model, data.test_x, data.test_y, 512, data.task)
    path.write_text(json.dumps({"test_loss": loss, "test_accuracy": acc}, indent=2) + "\n")


def tuning_table() -> str:
    lines = [
        "| run | client lr | server lr | mean train loss, rounds 11-15 | test loss, round 15 |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(p.name for p in RUNS.glob("tune_*")):
        if summary(name, TUNE_ROUNDS) is None:
            continue
        config = (RUNS / name / "config.yaml").read_text()
        client = re.search(r"^    lr: (\S+)", config, re.M)
        server = re.search(r"^  server_lr: (\S+)", config, re.M)
        lines.append(
            f"| {name} | {client.group(1) if client else '?'} | "
            f"{server.group(1) if server else '—'} | {tail_loss(name):.4f} | "
            f"{tune_loss(name):.4f} |"
        )
    return "\n".join(lines)


def plot() -> None:
    """Test perplexity by round, every arm (local-only: each client's own model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    start = baseline()
    for name, (label, _, _) in ARMS.items():
        prefix = "local_test" if name.endswith("_local") else "test"
        points = [(0, start["test_loss"])] if start is not None else []
        points += [(r["round"], r[f"{prefix}_loss"]) for r in rows(name) if "test_loss" in r]
        if len(points) > 1:
            ax.plot(*zip(*[(x, math.exp(y)) for x, y in points]), marker=".", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test perplexity")
    ax.set_title("Federated fine-tuning of the pretrained GPT on 18 plays")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "curves.png", dpi=120)
    plt.close(fig)


def write_table() -> None:
    (RESULTS / "tuning.md").write_text(tuning_table() + "\n")
    plot()
    text = table()
    (RESULTS / "table.md").write_text(text + "\n")
    replace_block(HERE / "README.md", "table", text)
    replace_block(REPO / "README.md", "llm", text)
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one per core)")
    parser.add_argument("--stop-at", metavar="HH:MM", help="interrupt the runs at this time")
    parser.add_argument("--only", nargs="*", default=[], help="runs whose name contains one")
    parser.add_argument("--table", action="store_true", help="rebuild the table and stop")
    args = parser.parse_args()
    if not args.table:
        measure_baseline()
        deadline = stop_time(args.stop_at) if args.stop_at else None
        interruptible()
        lock, started, running = threading.Lock(), set(), set()

        def next_run():
            for name, overrides, rounds, every in plan():
                wanted = not args.only or any(o in name for o in args.only)
                failed = (RUNS / name / "FAILED.md").exists()
                if wanted and not failed and name not in started and summary(name, rounds) is None:
                    return name, overrides, rounds, every
            return None

        def worker() -> None:
            while deadline is None or time.time() < deadline:
                with lock:
                    job = next_run()
                    if job is None and not running:
                        return
                    if job is not None:
                        started.add(job[0])
                        running.add(job[0])
                if job is None:  # what is left waits on a running tuning run
                    time.sleep(5)
                    continue
                finished = run_one(*job, args.threads, deadline)
                with lock:
                    running.discard(job[0])
                    write_table()
                if not finished:
                    return

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in [pool.submit(worker) for _ in range(args.jobs)]:
                future.result()
    write_table()


if __name__ == "__main__":
    main()
