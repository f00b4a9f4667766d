"""Cost of one SecAgg+ round: the complete graph (Bonawitz et al. 2017) against the sparse
k-regular graph (Bell et al. 2020), client and server seconds and bytes.

Each cell runs one whole round of :func:`fedtorch.privacy.secagg_plus.run_round` in this
process: K clients and the server, every message serialized to bytes and parsed back, with
the inputs built lazily (one client's vector at a time) so memory does not grow with K. The
cost that matters is one client's and the server's: client seconds are the mean over the
clients of each stage's time (the client's own work: keys, Shamir sharing, sealing and
opening shares, expanding and adding masks, serializing), server seconds the server's whole
work (parsing, routing, the running sum, reconstructions, unmasking). Bytes are the
serialized messages' lengths: per client, sent and received; in total, what the server
received. Every cell checks the unmasked sum against the plain sum.

Resumable: cells already in the JSON are skipped; results are written after every cell.

    python experiments/privacy/secagg_cost.py                      # K 10..1000, P = 1e6
    python experiments/privacy/secagg_cost.py --large              # also K = 50, P = 38e6
    python experiments/privacy/secagg_cost.py --clients 10 --sizes 10000 --out-dir /tmp/sa
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cryptography
import torch

from fedtorch.privacy.secagg_plus import (
    RoundReport,
    SecAggPlusConfig,
    choose_degree,
    plain_ring_sum,
    run_round,
)

HERE = Path(__file__).resolve().parent
CLIENTS = [10, 50, 200, 1000]
SIZES = [1_000_000]
LARGE = (50, 38_000_000)  # a cell behind --large: a 38M-parameter model, 50 clients
GRAPHS = ["complete", "sparse"]


class LazyInputs(Sequence[torch.Tensor]):
    """Client i's random ring vector, built when asked (seeded by i: benchmark data, not a
    secret), while keeping the plain ring sum of everything handed out for the check."""

    def __init__(self, num_clients: int, size: int, bits: int) -> None:
        self.num_clients, self.size, self.bits = num_clients, size, bits
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("LazyInputs is indexed by one client id")
        gen = torch.Generator().manual_seed(index)
        values = torch.randint(0, 1 << min(self.bits, 62), (self.size,), generator=gen)
        if self.reference is None:
            self.reference = values.clone()
        else:
            self.reference = plain_ring_sum([self.reference, values], self.bits)
        return values


def cell_key(graph: str, clients: int, size: int, bits: int, drop: float) -> str:
    return f"{graph}-K{clients}-P{size}-b{bits}-drop{drop:g}"


def run_cell(
    graph: str, clients: int, size: int, bits: int, drop: float, rates: tuple[float, float]
) -> dict[str, Any]:
    """One round; its cost summary and whether the sum was right."""
    dropout_rate, corruption_rate = rates
    config = SecAggPlusConfig(
        bits=bits,
        dropout_rate=dropout_rate,
        corruption_rate=corruption_rate,
        complete_graph=graph == "complete",
    )
    dropped = set(range(0, clients, max(1, round(1 / drop)))) if drop > 0 else set()
    inputs = LazyInputs(clients, size, bits)
    start = time.perf_counter()
    report: RoundReport = run_round(inputs, config, drop={3: dropped}, size=size)
    wall = time.perf_counter() - start
    verified = inputs.reference is not None and torch.equal(report.total, inputs.reference)
    summary = report.to_dict()
    summary.update(
        graph=graph,
        size=size,
        bits=bits,
        dropped_at_stage3=len(dropped),
        dropout_rate=dropout_rate,
        corruption_rate=corruption_rate,
        server_bytes_in=sum(s.bytes_up for s in report.stages.values()),
        wall_seconds=wall,
        verified=verified,
    )
    return summary


def table(cells: dict[str, dict[str, Any]]) -> str:
    """The markdown table of every recorded cell."""
    lines = [
        "| graph | K | P | k | t | client s | server s | client MB up | client MB down "
        "| server MB in | sum ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(cells.values(), key=lambda c: (c["size"], c["num_clients"], c["graph"]))
    for c in order:
        lines.append(
            f"| {c['graph']} | {c['num_clients']} | {c['size']:,} | {c['degree']} | "
            f"{c['threshold']} | {c['client_seconds_per_client']:.3f} | "
            f"{c['server_seconds']:.3f} | {c['bytes_up_per_client'] / 1e6:.3f} | "
            f"{c['bytes_down_per_client'] / 1e6:.4f} | {c['server_bytes_in'] / 1e6:.1f} | "
            f"{'yes' if c['verified'] else 'NO'} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cryptography": cryptography.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a half-written file never replaces a good one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENTS, help="K values")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="P values")
    parser.add_argument("--graphs", nargs="+", choices=GRAPHS, default=GRAPHS)
    parser.add_argument("--bits", type=int, default=32, help="ring Z_(2^bits)")
    parser.add_argument("--large", action="store_true", help=f"add K={LARGE[0]}, P={LARGE[1]:,}")
    parser.add_argument(
        "--drop", type=float, default=0.0, help="fraction of clients dropping before stage 3"
    )
    parser.add_argument("--dropout-rate", type=float, default=0.1, help="sizes the sparse graph")
    parser.add_argument("--corruption-rate", type=float, default=0.1, help="sizes the graph")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "secagg_cost.json"
    data = json.loads(json_path.read_text()) if json_path.exists() else {"cells": {}}
    cells = [(k, p) for p in args.sizes for k in args.clients]
    if args.large:
        cells.append(LARGE)
    rates = (args.dropout_rate, args.corruption_rate)
    for clients, size in cells:
        for graph in args.graphs:
            key = cell_key(graph, clients, size, args.bits, args.drop)
            if key in data["cells"]:
                print(f"{key}: recorded, skipped")
                continue
            if graph == "sparse":
                choice = choose_degree(clients, *rates)
                print(f"{key}: k = {choice.degree}, t = {choice.threshold} ...", flush=True)
            else:
                print(f"{key}: complete graph ...", flush=True)
            cell = run_cell(graph, clients, size, args.bits, args.drop, rates)
            cell["environment"] = environment()
            data["cells"][key] = cell
            save(json_path, data)
            print(
                f"  client {cell['client_seconds_per_client']:.3f} s, server "
                f"{cell['server_seconds']:.3f} s, client up {cell['bytes_up_per_client']:,.0f} B,"
                f" sum {'ok' if cell['verified'] else 'WRONG'}",
                flush=True,
            )
    markdown = table(data["cells"])
    (args.out_dir / "secagg_cost.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
