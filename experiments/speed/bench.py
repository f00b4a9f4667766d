"""Speed benchmark: reference FedAvg loop vs fedtorch engines vs Flower, one invocation.

Every engine trains the same workload: the same Fashion-MNIST tensors, client split, cohort
per round, batch order, initial weights and hyperparameters. Each run is a separate process
(no thread contention: runs never overlap), measured the same way from outside: its memory
is the PSS of its whole process tree, sampled every 0.2 s (memory.py). With --repeats R the
engines run interleaved R times. Writes results.json and the table in README.md.

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
from memory import TreeMemorySampler

from fedtorch import seeding
from fedtorch.config.build import build
from fedtorch.server.sampling import sample_clients

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import replace_block  # noqa: E402

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
# C runs 10 rounds: Flower takes over 10 s a round there (see README.md).
ROUNDS = {"A": 20, "B": 20, "C": 10}
DESCRIPTIONS = {
    "A": "2NN, 100 clients, 2 shards each, 10 a round, E=1, B=10, lr 0.05, 20 rounds",
    "B": "McMahan CNN, same split and schedule as A",
    "C": "2NN, 1000 clients Dir(0.3), 100 a round, E=1, B=10, lr 0.05, 10 rounds",
}
ENGINES = ("reference", "sequential", "vectorized", "distributed", "flower")
# Variants of engine=distributed that can be asked for with --engines.
DISTRIBUTED = {
    "distributed": [],
    "distributed-allreduce": ["aggregation.collective=allreduce"],
    "distributed-chunk10": ["engine.chunk_size=10"],
}
# engine=distributed: this many torchrun processes with one thread each (against one
# process with --threads threads for the other engines).
RANKS = 2
FLOWER_REQUIREMENT = "flwr[simulation]==1.42.*"


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
) -> dict:
    """Run one engine in its own process; return its JSON line plus memory and timings."""
    # PYTHONPATH: the spec pickles fedtorch's model classes (plain nn.Modules); Flower's venv
    # and its Ray workers import them from this checkout.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parents[1])}
    torchrun_dir = None
    if engine == "reference":
        cmd = [sys.executable, str(HERE / "reference.py"), str(spec)]
    elif engine in DISTRIBUTED:
        torchrun_dir = Path(tempfile.mkdtemp())
        env["OMP_NUM_THREADS"] = "1"
        cmd = [
            sys.executable,
            "-m",
            "fedtorch.launch",
            f"--nproc_per_node={RANKS}",
            "--",
            *WORKLOADS[workload],
            *extra,
            *DISTRIBUTED[engine],
            "torch_threads=1",
            "checkpoint.every=0",
            f"hydra.run.dir={torchrun_dir}",
        ]
    elif engine == "flower":
        cmd = [flower_python, str(HERE / "flower_run.py"), str(spec)]
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with TreeMemorySampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {
            "error": stderr.strip().splitlines()[-1]
            if stderr.strip()
            else f"exit {proc.returncode}"
        }
    process_s = time.perf_counter() - t0
    if torchrun_dir is not None:
        result = _distributed_result(torchrun_dir, process_s)
    else:
        result = json.loads(stdout.strip().splitlines()[-1])
    result["process_s"] = process_s
    result["median_round_s"] = statistics.median(result["round_times"])
    result.update(sampler.peaks_mb())
    return result


def _distributed_result(run_dir: Path, process_s: float) -> dict:
    """The JSON line fedtorch_run.py prints, read from a torchrun run's folder. Set-up is
    the launch (torchrun, every rank's start, the rendezvous) to the start of round 1:
    the process time less the round loop's (and the negligible shutdown)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    before_round_1 = rows[0]["elapsed_s"] - rows[0]["round_time_s"]
    return {
        "setup_s": process_s - rows[-1]["elapsed_s"] + before_round_1,
        "round_times": [r["round_time_s"] for r in rows],
        "accuracies": [r["test_accuracy"] for r in rows if "test_accuracy" in r],
        "final_accuracy": summary["final_accuracy"],
    }


def flower_python(skip: bool) -> str | None:
    """Python of a venv with Flower (FLOWER_REQUIREMENT), made beside this script if missing.

    flower_run.py is written against Flower 1.42's Message API; a venv holding another
    version is upgraded in place.
    """
    if skip:
        return None
    venv = Path(os.environ.get("FLOWER_VENV", HERE / ".flower-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing {FLOWER_REQUIREMENT} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        # Reuse this environment's torch instead of downloading another copy.
        (site / "base_env.pth").write_text(
            next(p for p in sys.path if p.endswith("site-packages")) + "\n"
        )
    check = "import flwr, ray; assert flwr.__version__.startswith('1.42.'), flwr.__version__"
    if subprocess.run([python, "-c", check], capture_output=True).returncode != 0:
        install = subprocess.run(
            [python, "-m", "pip", "install", "-q", FLOWER_REQUIREMENT],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            print(
                "Flower could not be installed; continuing without it:",
                install.stderr.strip()[-300:],
            )
            return None
    checked = subprocess.run([python, "-c", check], capture_output=True, text=True)
    if checked.returncode != 0:
        print("Flower is not importable; continuing without it:", checked.stderr.strip()[-300:])
        return None
    return str(python)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, help="rounds of every workload (default: ROUNDS)")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument(
        "--block", default="results", help="the README.md block (<!-- NAME:start -->) to fill"
    )
    args = parser.parse_args()
    engines = args.engines.split(",")
    fl_python = flower_python("flower" not in engines)
    if fl_python is None and "flower" in engines:
        engines.remove("flower")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "workloads": {},
    }
    workdir = Path(tempfile.mkdtemp())
    for name in args.workloads.split(","):
        extra = [f"data.root={args.data_root}", f"rounds={args.rounds or ROUNDS[name]}"]
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
                result = run_engine(engine, name, spec_path, extra, args.threads, fl_python)
                entry["runs"][engine].append(result)
                shown = {k: v for k, v in result.items() if k not in ("round_times", "accuracies")}
                print(f"{name} {engine} #{rep}: {json.dumps(shown)}", flush=True)
        report["workloads"][name] = entry
        Path(args.out).write_text(json.dumps(report, indent=2))
    table = render_table(report)
    print(table)
    replace_block(HERE / "README.md", args.block, table)


def render_table(report: dict) -> str:
    """Markdown table of the report: one row per workload and engine (medians over runs)."""
    lines = [
        f"Machine: {report['machine']}; {report['date']}; median of {report['repeats']} "
        "interleaved run(s) per engine. Setup: process start to the start of round 1. "
        "PSS: peak over the run, of the process tree's sum and of its largest process.",
        "",
        "| workload | engine | median round (s) | setup (s) | samples/s | vs reference "
        "| vs floor | final acc (%) | per-round acc vs reference | peak PSS summed (MB) "
        "| largest process PSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in report["workloads"].items():
        ref_runs = [r for r in w["runs"].get("reference", []) if "error" not in r]
        ref = _median([r["median_round_s"] for r in ref_runs])
        rounds = max(
            (len(r["round_times"]) for rs in w["runs"].values() for r in rs if "round_times" in r),
            default=1,
        )
        per_round_samples = w["samples"] / rounds
        floor_round = w["floor_s"] / rounds
        for engine, runs in w["runs"].items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                error = runs[0]["error"] if runs else "not run"
                lines.append(f"| {name} | {engine} | failed: {error} |" + " |" * 8)
                continue
            med = _median([r["median_round_s"] for r in ok])
            cells = [
                name,
                engine,
                f"{med:.3f}",
                f"{_median([r['setup_s'] for r in ok]):.2f}",
                f"{per_round_samples / med:,.0f}",
                f"{ref / med:.2f}x" if ref else "",
                f"{med / floor_round:.2f}x",
                f"{100 * _median([r['final_accuracy'] for r in ok]):.2f}",
                _accuracy_match(ok, ref_runs[0] if ref_runs else None),
                f"{max(r['peak_pss_sum_mb'] for r in ok):.0f}",
                f"{max(r['peak_pss_max_mb'] for r in ok):.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _accuracy_match(runs: list[dict], reference: dict | None) -> str:
    """'identical' when every run's per-round accuracies equal the reference's, else the
    largest gap in points."""
    if reference is None:
        return ""
    if any(len(r["accuracies"]) != len(reference["accuracies"]) for r in runs):
        return "other rounds"
    gaps = [abs(a - b) for r in runs for a, b in zip(r["accuracies"], reference["accuracies"])]
    return "identical" if max(gaps, default=0) == 0 else f"max gap {100 * max(gaps):.2f} pts"


def _median(values):
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
