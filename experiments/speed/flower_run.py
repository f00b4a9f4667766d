"""The same workload in Flower's simulation engine (Ray backend), for bench.py.

Runs in a virtual environment with flwr[simulation]; reads the spec bench.py wrote (data,
client index lists, initial weights, hyperparameters). Flower samples its own cohorts
(the same number per round). Prints one JSON line: per-round wall times (between the
server's central evaluations), final accuracy, and the peak RSS summed over the process
tree (Ray workers included), sampled every 0.2 s.

    python flower_run.py SPEC.pt
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

SPEC_PATH = sys.argv[1] if len(sys.argv) > 1 else ""
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else None
_cache: dict = {}


def spec() -> dict:
    if not _cache:
        _cache.update(torch.load(SPEC_PATH, weights_only=False))
        torch.set_num_threads(_cache["threads"])
    return _cache


def get_weights(model) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights)})


class TorchClient(NumPyClient):
    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, parameters, config):
        s = spec()
        model = s["model_factory"]()
        set_weights(model, parameters)
        opt = torch.optim.SGD(model.parameters(), lr=s["lr"])
        idx = s["shards"][self.cid]
        gen = torch.Generator().manual_seed(int(config.get("round", 0)) * 10_007 + self.cid)
        for _ in range(s["epochs"]):
            order = idx[torch.randperm(len(idx), generator=gen)]
            for start in range(0, len(order), s["batch_size"]):
                b = order[start : start + s["batch_size"]]
                loss = F.cross_entropy(model(s["train_x"][b]), s["train_y"][b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return get_weights(model), len(idx), {}


def client_fn(context: Context):
    return TorchClient(int(context.node_config["partition-id"])).to_client()


def main() -> None:
    s = spec()
    stamps: list[float] = []
    accuracy = [0.0]

    def evaluate(server_round, parameters, config):
        model = s["model_factory"]()
        set_weights(model, parameters)
        model.eval()
        with torch.no_grad():
            pred = torch.cat(
                [
                    model(s["test_x"][i : i + 1000]).argmax(1)
                    for i in range(0, len(s["test_x"]), 1000)
                ]
            )
        accuracy[0] = float((pred == s["test_y"]).float().mean())
        stamps.append(time.perf_counter())
        return 0.0, {"accuracy": accuracy[0]}

    def server_fn(context: Context):
        init = [v.numpy() for v in s["init_state"].values()]
        strategy = FedAvg(
            fraction_fit=s["clients_per_round"] / s["num_clients"],
            min_fit_clients=s["clients_per_round"],
            min_available_clients=s["num_clients"],
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            evaluate_fn=evaluate,
            on_fit_config_fn=lambda r: {"round": r},
            initial_parameters=ndarrays_to_parameters(init),
        )
        return ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=ROUNDS or s["rounds"])
        )

    peak = [0.0]
    done = threading.Event()

    def watch():
        me = psutil.Process()
        while not done.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=s["num_clients"],
        backend_config={"client_resources": {"num_cpus": s["threads"], "num_gpus": 0.0}},
    )
    done.set()
    round_times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    print(
        json.dumps(
            {
                "round_times": round_times,
                "final_accuracy": accuracy[0],
                "peak_rss_mb": peak[0] / 2**20,
            }
        )
    )


if __name__ == "__main__":
    main()
