"""The same workload in Flower's simulation runtime (Ray backend), for bench.py.

Flower 1.42's Message API: a `ClientApp` whose train function runs reference.py's local loop,
and a `ServerApp` whose main function runs Flower's `FedAvg` strategy with central
evaluation. Only what the benchmark needs to train exactly the reference's run is adapted:

- round r trains the spec's `cohorts[r-1]`, not a random sample of nodes: the server asks
  every node once for its `partition-id` (a query message; Flower's node ids are random)
  and sends round r's train messages to the nodes holding that cohort's partitions;
- replies are aggregated in cohort order (they arrive in completion order, and float sums
  depend on the order) by FedAvg's own weighted average;
- a client seeds its batch order with the spec's `batch_seeds[(round, partition)]`;
- the initial global model is the spec's `init_state`, and the server tests the global model
  after every round (the strategy's `evaluate_fn`), as the reference does.

Each process reads the spec once (the server at start, a Ray worker on the first message it
runs), keeps only what its side needs, and reuses it and one model for every message.
Runs in a virtual environment with flwr[simulation]; prints one JSON line like
reference.py: set-up time (process start to the start of round 1), per-round wall times
(train messages sent, replies aggregated, test set evaluated) and per-round accuracies.

    python flower_run.py SPEC.pt
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from memory import process_age_s
from reference import local_train, test_accuracy

SPEC_ENV = "FLOWER_BENCH_SPEC"  # the spec's path; Ray's worker processes inherit it
CLIENT_KEYS = ("train_x", "train_y", "shards", "batch_seeds", "lr", "batch_size", "epochs")
SERVER_KEYS = ("test_x", "test_y", "cohorts", "init_state", "num_clients", "threads")

# Filled by the ServerApp (a thread of this process) for the JSON line.
report: dict = {"round_starts": [], "round_ends": [], "accuracies": []}


@functools.cache
def workload(side: str) -> dict:
    """What `side` ("client" or "server") needs from the spec: read once per process.

    Also sets this process's torch threads to the spec's, like the other runners, and
    builds the one model the process reuses.
    """
    spec = torch.load(os.environ[SPEC_ENV], weights_only=False)
    torch.set_num_threads(spec["threads"])
    part = {k: spec[k] for k in (CLIENT_KEYS if side == "client" else SERVER_KEYS)}
    part["model"] = spec["model_factory"]()
    return part


# ---------------------------------------------------------------------------- ClientApp

client_app = ClientApp()


@client_app.query()
def report_partition(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client of the spec) this node holds.

    The server asks every node once, before round 1: the worker process running the first
    query also loads the data then, so that set-up is not billed to round 1.
    """
    workload("client")
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD from the received global model on this node's partition; reply the weights."""
    data = workload("client")
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    model = data["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    idx = data["shards"][partition]
    local_train(model, data, idx, data["batch_seeds"][(server_round, partition)])
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(idx)}),
        }
    )
    return Message(reply, reply_to=msg)


# ---------------------------------------------------------------------------- ServerApp


class CohortFedAvg(FedAvg):
    """Flower's FedAvg, training the spec's cohort of each round instead of a random sample."""

    def __init__(self, cohorts: list[list[int]], node_of: dict[int, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.cohorts = cohorts
        self.node_of = node_of  # partition id -> node id

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message (global weights, round number) to each node of the cohort."""
        if server_round == 1:
            report["setup_s"] = process_age_s()
        report["round_starts"].append(time.perf_counter())
        config["server-round"] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            Message(content, dst_node_id=self.node_of[p], message_type=MessageType.TRAIN)
            for p in self.cohorts[server_round - 1]
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted average, over the replies put in cohort order first.

        A failed or missing client stops the run: FedAvg would average the others, and the
        run would no longer be the reference's.
        """
        cohort = self.cohorts[server_round - 1]
        replies = list(replies)
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed or len(replies) != len(cohort):
            raise RuntimeError(
                f"round {server_round}: {len(replies)} replies for {len(cohort)} clients, "
                f"{len(failed)} failed" + (f"; first: {failed[0][-300:]}" if failed else "")
            )
        position = {self.node_of[p]: i for i, p in enumerate(cohort)}
        ordered = sorted(replies, key=lambda reply: position[reply.metadata.src_node_id])
        return super().aggregate_train(server_round, ordered)


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
    """Test accuracy of the global model after a round (the reference skips round 0)."""
    if server_round == 0:
        return None
    data = workload("server")
    model = data["model"]
    model.load_state_dict(arrays.to_torch_state_dict())
    accuracy = test_accuracy(model, data["test_x"], data["test_y"])
    report["accuracies"].append(accuracy)
    report["round_ends"].append(time.perf_counter())
    return MetricRecord({"accuracy": accuracy})


def partition_nodes(grid: Grid, num_nodes: int) -> dict[int, int]:
    """Partition id -> node id, asked once of every node."""
    while len(node_ids := list(grid.get_node_ids())) < num_nodes:
        time.sleep(0.1)
    queries = [
        Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids
    ]
    mapping = {}
    for reply in grid.send_and_receive(queries):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        mapping[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
    return mapping


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """FedAvg over the spec's cohorts from its initial weights, tested after every round."""
    data = workload("server")
    strategy = CohortFedAvg(
        data["cohorts"],
        partition_nodes(grid, data["num_clients"]),
        fraction_evaluate=0.0,  # no federated evaluation: the server tests centrally
        min_available_nodes=data["num_clients"],
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(data["init_state"]),
        num_rounds=len(data["cohorts"]),
        evaluate_fn=central_evaluate,
    )


# ---------------------------------------------------------------------------- launcher


def run(spec_path: str) -> dict:
    """Run the simulation (one virtual node per client) and return the JSON line's fields."""
    os.environ[SPEC_ENV] = str(Path(spec_path).resolve())
    data = workload("server")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=data["num_clients"],
        # One Ray actor per `threads` CPUs: on the benchmark's machine, one worker process.
        backend_config={"client_resources": {"num_cpus": data["threads"], "num_gpus": 0.0}},
    )
    accuracies = report["accuracies"]
    if len(accuracies) != len(data["cohorts"]):
        sys.exit(f"Flower stopped after {len(accuracies)} of {len(data['cohorts'])} rounds")
    return {
        "setup_s": report["setup_s"],
        "round_times": [b - a for a, b in zip(report["round_starts"], report["round_ends"])],
        "accuracies": accuracies,
        "final_accuracy": accuracies[-1],
    }


if __name__ == "__main__":
    # Run everything from the module `flower_run`, not `__main__`: Ray's pickler copies
    # functions of `__main__` by value, with the globals they touch, into every task it
    # submits (the old runner shipped its loaded spec with each message that way), while
    # functions of an importable module travel as a reference.
    import flower_run

    print(json.dumps(flower_run.run(sys.argv[1])))
