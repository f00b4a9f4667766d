"""Speed benchmark: reference FedAvg loop vs fedtorch engines (vs Flower), one invocation.

Every engine trains the same workload: the same Fashion-MNIST tensors, client split, cohort
per round, initial weights and hyperparameters. Each run is a separate process (clean peak
RSS, no thread contention: runs never overlap), and with --repeats R the engines run
interleaved R times. Writes results.json and the table in README.md.

    python experiments/speed/bench.py --workloads A,B,C --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from fedtorch import seeding
from fedtorch.build import build
from fedtorch.sampling import sample_clients

HERE = Path(__file__).resolve().parent
COMMON = [
    "dataset=fashion_mnist",
    "data.download=false",
    "num_clients=100",
    "clients_per_round=10",
    "client.epochs=1",
    "client.batch_size=10",
    "client.optimizer.lr=0.05",
    "rounds=20",
    "eval_every=1",
    "logger=quiet",
    "device=cpu",
    "seed=0",
]
WORKLOADS = {
    "A": [*COMMON, "model=mlp", "partition=shards", "partition.shards_per_client=2"],
    "B": [*COMMON, "model=cnn", "partition=shards", "partition.shards_per_client=2"],
    "C": [
        *COMMON,
        "model=mlp",
        "partition=dirichlet",
        "partition.alpha=0.3",
        "num_clients=1000",
        "clients_per_round=100",
    ],
}
DESCRIPTIONS = {
    "A": "2NN, 100 clients, 2 shards each, 10 a round, E=1, B=10, lr 0.05, 20 rounds",
    "B": "McMahan CNN, same split and schedule as A",
    "C": "2NN, 1000 clients Dir(0.3), 100 a round, E=1, B=10, lr 0.05, 20 rounds",
}
ENGINES = ("reference", "sequential", "vectorized", "flower")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def compose_workload(name: str, extra: list[str]):
    with initialize_config_module(config_module="fedtorch.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[*WORKLOADS[name], *extra])


def write_spec(name: str, extra: list[str], threads: int, path: Path) -> dict:
    """Build the workload once with fedtorch and save what the other loops need."""
    cfg = compose_workload(name, extra)
    orch = build(cfg, Path(tempfile.mkdtemp()))
    data = orch.data
    cohorts = [
        sample_clients(cfg.num_clients, cfg.clients_per_round, cfg.seed, r)
        for r in range(1, cfg.rounds + 1)
    ]
    model_cls = type(orch.model)
    kwargs = {"input_shape": list(data.input_shape), "num_classes": data.num_classes}
    if "hidden" in cfg.model:
        kwargs["hidden"] = list(cfg.model.hidden)
    spec = {
        "train_x": data.train_x,
        "train_y": data.train_y,
        "test_x": data.test_x,
        "test_y": data.test_y,
        "shards": [s.cpu() for s in orch.shards],
        "cohorts": cohorts,
        "init_state": {k: v.cpu() for k, v in orch.global_state.items()},
        "model_factory": functools.partial(model_cls, **kwargs),
        "lr": cfg.client.optimizer.lr,
        "batch_size": cfg.client.batch_size,
        "epochs": cfg.client.epochs,
        "seed": cfg.seed,
        # Batch-order seed of every (round, client): the same random stream fedtorch uses,
        # so all loops see the same minibatches.
        "batch_seeds": {
            (r, c): seeding.derive_seed(cfg.seed, seeding.CLIENT_TRAINING, r, c)
            for r, cohort in enumerate(cohorts, start=1)
            for c in cohort
        },
        "threads": threads,
        "rounds": cfg.rounds,
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
    }
    torch.save(spec, path)
    samples = sum(len(spec["shards"][c]) for cohort in cohorts for c in cohort) * cfg.client.epochs
    return {
        "samples": samples,
        "factory": spec["model_factory"],
        "input_shape": tuple(data.input_shape),
    }


def compute_floor(factory, input_shape, threads: int) -> dict[int, float]:
    """Samples/s of forward+backward+SGD step at batch 10, 100 and 1000 (best of 3)."""
    torch.set_num_threads(threads)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rates = {}
    for batch in (10, 100, 1000):
        x = torch.randn(batch, *input_shape)
        y = torch.randint(0, 10, (batch,))
        steps = max(3, 4000 // batch)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            best = min(best, time.perf_counter() - t0)
        rates[batch] = steps * batch / best
    return rates


def run_engine(
    engine: str,
    workload: str,
    spec: Path,
    extra: list[str],
    threads: int,
    flower_python: str | None,
    flower_rounds: int,
) -> dict:
    # PYTHONPATH: the spec pickles fedtorch's model classes (plain nn.Modules); Flower's venv
    # and its Ray workers import them from this checkout.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parents[1])}
    if engine == "reference":
        cmd = [sys.executable, str(HERE / "reference.py"), str(spec)]
    elif engine == "flower":
        cmd = [flower_python, str(HERE / "flower_run.py"), str(spec), str(flower_rounds)]
    else:
        run_dir = tempfile.mkdtemp()
        cmd = [
            sys.executable,
            str(HERE / "fedtorch_run.py"),
            run_dir,
            *WORKLOADS[workload],
            *extra,
            f"engine={engine}",
            f"torch_threads={threads}",
        ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    result["median_round_s"] = statistics.median(result["round_times"])
    return result


def flower_python(skip: bool) -> str | None:
    """Python of a venv with flwr[simulation], made beside this script if missing."""
    if skip:
        return None
    venv = Path(os.environ.get("FLOWER_VENV", HERE / ".flower-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing flwr[simulation] into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        # Reuse this environment's torch instead of downloading another copy.
        (site / "base_env.pth").write_text(
            next(p for p in sys.path if p.endswith("site-packages")) + "\n"
        )
        install = subprocess.run(
            [python, "-m", "pip", "install", "-q", "flwr[simulation]", "psutil"],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            print(
                "Flower could not be installed; continuing without it:",
                install.stderr.strip()[-300:],
            )
            return None
    check = subprocess.run([python, "-c", "import flwr, ray"], capture_output=True, text=True)
    if check.returncode != 0:
        print("Flower is not importable; continuing without it:", check.stderr.strip()[-300:])
        return None
    return str(python)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--flower-rounds",
        type=int,
        default=3,
        help="rounds Flower runs (it is ~20-100x slower; its accuracy is then not comparable)",
    )
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    engines = args.engines.split(",")
    fl_python = flower_python("flower" not in engines)
    if fl_python is None and "flower" in engines:
        engines.remove("flower")
    extra = [f"data.root={args.data_root}", f"rounds={args.rounds}"]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "flower_rounds": args.flower_rounds,
        "repeats": args.repeats,
        "workloads": {},
    }
    workdir = Path(tempfile.mkdtemp())
    for name in args.workloads.split(","):
        spec_path = workdir / f"{name}.pt"
        info = write_spec(name, extra, args.threads, spec_path)
        floor = compute_floor(info["factory"], info["input_shape"], args.threads)
        entry = {
            "description": DESCRIPTIONS[name],
            "samples": info["samples"],
            "floor_samples_per_s": {str(k): round(v) for k, v in floor.items()},
            "floor_s": info["samples"] / max(floor.values()),
            "runs": {e: [] for e in engines},
        }
        for rep in range(args.repeats):
            for engine in engines:
                if engine == "flower" and rep > 0:
                    continue  # one Flower run per workload: it dominates the benchmark's time
                result = run_engine(
                    engine, name, spec_path, extra, args.threads, fl_python, args.flower_rounds
                )
                entry["runs"][engine].append(result)
                print(
                    f"{name} {engine} #{rep}: "
                    + json.dumps({k: v for k, v in result.items() if k != "round_times"}),
                    flush=True,
                )
        report["workloads"][name] = entry
        Path(args.out).write_text(json.dumps(report, indent=2))
    table = render_table(report)
    print(table)
    readme = HERE / "README.md"
    if readme.is_file() and START in readme.read_text():
        text = readme.read_text()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
        print(f"updated {readme}")


def render_table(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; {report['date']}; median of {report['repeats']} "
        f"interleaved run(s) per engine, Flower once for {report['flower_rounds']} rounds.",
        "",
    ]
    lines.append(
        "| workload | engine | median round (s) | samples/s | vs reference | vs floor "
        "| final acc (%) | peak RSS (MB) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, w in report["workloads"].items():
        ref = _median(
            [r["median_round_s"] for r in w["runs"].get("reference", []) if "error" not in r]
        )
        rounds = len(
            next(
                (
                    r["round_times"]
                    for runs in w["runs"].values()
                    for r in runs
                    if "round_times" in r
                ),
                [1],
            )
        )
        per_round_samples = w["samples"] / max(rounds, 1)
        floor_round = w["floor_s"] / max(rounds, 1)
        for engine, runs in w["runs"].items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                lines.append(
                    f"| {name} | {engine} | failed: {runs[0]['error'] if runs else 'not run'} "
                    "| | | | | |"
                )
                continue
            med = _median([r["median_round_s"] for r in ok])
            speedup = f"{ref / med:.2f}x" if ref else ""
            accuracy = 100 * _median([r["final_accuracy"] for r in ok])
            acc_text = f"{accuracy:.2f}"
            if len(ok[0]["round_times"]) < rounds:
                acc_text += f" (after {len(ok[0]['round_times'])} rounds)"
            lines.append(
                f"| {name} | {engine} | {med:.3f} | {per_round_samples / med:,.0f} | {speedup} | "
                f"{med / floor_round:.2f}x | {acc_text} | {max(r['peak_rss_mb'] for r in ok):.0f} |"
            )
    return "\n".join(lines)


def _median(values):
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
