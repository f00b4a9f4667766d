"""Cross-silo data (``data.silos``): each silo's clients come from the silo's own files.

``data.silos`` lists the silos, each a mapping of ``data`` keys that differ for it (its
``root``, say) plus, unless ``partition=natural``, its ``num_clients``. A silo's data is
loaded and partitioned into clients on its own (seeded by the run seed and the silo's
index); the clients are numbered silo after silo. Test sets stay in their silos too: the
global model is evaluated on each silo's test split and the totals are pooled in silo
order (federated evaluation).

In one process every silo is loaded (a simulation of the deployment). Under
``engine=distributed`` each process serves the one silo ``distributed.silo`` names: it
loads only that silo's files, trains only its clients and evaluates on its test split,
and tells the others no more than its clients' sizes and label histograms. The silo comes
from the config (set per machine), not from the rank, which can change when torchrun
restarts the job; every silo must be served by exactly one process.

What the processes tell each other at start-up is integers in tensors, nothing pickled:
each its silo's index, then its clients' sizes and label histograms, read positionally
(a rank's entries can only be its own silo's) and checked before use: the announced
shape is capped before anything is allocated, the number of clients must be what
``data.silos`` says (where it says), every histogram must count its client's samples. A
violation stops every process with one line naming the rank (a :class:`DataError`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from fedtorch import seeding
from fedtorch.data.datasets import DataBundle
from fedtorch.errors import ConfigError, DataError

# Caps on what a silo's process may announce before the others allocate for it.
MAX_SILO_CLIENTS = 1 << 20
MAX_LABELS = 1 << 20  # width of a label histogram
MAX_CLASSES = 1 << 24  # a silo's number of classes (a language model's vocabulary, say)
MAX_HISTOGRAM_VALUES = 1 << 26  # clients x labels over all silos (int64: 512 MiB)


@dataclass
class Silos:
    """Where each client's data lives.

    Attributes:
        client_silo: the silo of every client (clients are numbered silo after silo).
        test_rows: for each silo loaded in this process, its rows of ``data.test_x``.
        rank_of_silo: under ``engine=distributed``, the rank serving each silo; None in
            one process.
    """

    client_silo: list[int]
    test_rows: dict[int, torch.Tensor]
    rank_of_silo: list[int] | None = None

    @property
    def rank_of_client(self) -> Placement:
        """The rank that holds each client's data (distributed runs): call it with a client
        id; it also carries ``rank_of_silo``, so an engine given it knows which silo each
        rank serves."""
        assert self.rank_of_silo is not None
        return Placement(self.client_silo, self.rank_of_silo)


@dataclass(frozen=True)
class Placement:
    """``placement(client_id)``: the rank holding that client's data."""

    client_silo: list[int]
    rank_of_silo: list[int]

    def __call__(self, client_id: int) -> int:
        return self.rank_of_silo[self.client_silo[client_id]]


def silo_specs(data_spec: Mapping[str, Any], silos: Any, natural: bool) -> list[dict[str, Any]]:
    """Each silo's full ``data`` spec: the shared keys with the silo's own on top. Each
    needs its ``num_clients`` unless the partition is natural (the data's own clients)."""
    if not isinstance(silos, list) or not silos:
        raise ConfigError(
            "data.silos", f"must be null or a non-empty list of mappings, got {silos!r}"
        )
    specs = []
    for index, entry in enumerate(silos):
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"data.silos.{index}", f"must be a mapping of data keys, got {entry!r}"
            )
        unknown = [k for k in entry if k not in data_spec and k != "num_clients"]
        if unknown:
            raise ConfigError(
                f"data.silos.{index}.{unknown[0]}",
                f"is not a data key; allowed: num_clients, {', '.join(sorted(data_spec))}",
            )
        if not natural and entry.get("num_clients") is None:
            raise ConfigError(
                f"data.silos.{index}.num_clients",
                "is needed: how many clients to cut this silo's data into (null only with "
                "partition=natural)",
            )
        specs.append({**data_spec, **entry})
    return specs


def served_silos(
    num_silos: int, silo: Any, distributed_run: bool
) -> tuple[list[int], list[int] | None]:
    """The silos this process loads, and (distributed) the rank serving each silo.

    Under torchrun every rank names its silo; the ranks compare them so that each silo is
    served exactly once (the same check, and the same one-line error, on every rank).
    """
    if not distributed_run:
        if silo is not None:
            raise ConfigError(
                "distributed.silo",
                "names the silo of one process of engine=distributed; in one process every "
                "silo is loaded: leave it null",
            )
        return list(range(num_silos)), None
    if isinstance(silo, bool) or not isinstance(silo, int) or not 0 <= silo < num_silos:
        raise ConfigError(
            "distributed.silo",
            f"must be this process's silo, an index 0..{num_silos - 1} into data.silos (set "
            f"per machine, e.g. distributed.silo=0), got {silo!r}",
        )
    rows = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, torch.tensor([silo], dtype=torch.int64))
    served = [int(r) for r in rows]
    if len(served) != num_silos or sorted(served) != list(range(num_silos)):
        per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(served))
        raise ConfigError(
            "distributed.silo",
            f"every one of the {num_silos} silos needs exactly one process, got {len(served)} "
            f"process(es) serving ({per_rank})",
        )
    rank_of_silo = [0] * num_silos
    for rank, s in enumerate(served):
        rank_of_silo[s] = rank
    return [silo], rank_of_silo


def load_silos(
    specs: list[dict[str, Any]],
    local: list[int],
    rank_of_silo: list[int] | None,
    seed: int,
    load: Callable[[dict[str, Any]], DataBundle],
    split: Callable[[DataBundle, int | None, int, str], list[torch.Tensor]],
) -> tuple[DataBundle, list[torch.Tensor], Silos, torch.Tensor]:
    """Load and partition the ``local`` silos; learn the others' client sizes.

    ``load(spec)`` loads one silo's data; ``split(data, num_clients, seed, key)`` cuts it
    into clients. Returns this process's data (the local silos' rows, concatenated), one
    shard per client of every silo (a client of a silo held elsewhere gets a placeholder
    of its size whose indices are -1: it is never trained here), the :class:`Silos` map,
    and every client's label histogram (for ``partition.json``).
    """
    bundles, shards_of = {}, {}
    for s in local:
        spec = dict(specs[s])
        num_clients = spec.pop("num_clients", None)
        bundle = load(spec)
        if not isinstance(bundle.train_x, torch.Tensor):
            raise ConfigError("data.in_memory", "false is not supported with data.silos; use true")
        bundles[s] = bundle
        shards_of[s] = split(
            bundle, num_clients, seeding.derive_seed(seed, seeding.PARTITION, s), f"data.silos.{s}"
        )
    first = bundles[local[0]]
    local_classes = max(b.num_classes for b in bundles.values())
    mine = {
        s: (
            [len(p) for p in shards_of[s]],
            [
                torch.bincount(bundles[s].labels_for_partition[p.cpu()].cpu(), minlength=1).tolist()
                for p in shards_of[s]
            ],
            local_classes,
        )
        for s in local
    }
    known = _exchange(mine, specs, rank_of_silo) if rank_of_silo is not None else mine
    num_classes = max(v[2] for v in known.values())

    train_x, train_y, test_x, test_y, labels = [], [], [], [], []
    shards: list[torch.Tensor] = []
    client_silo: list[int] = []
    test_rows: dict[int, torch.Tensor] = {}
    train_offset = test_offset = 0
    for s in range(len(specs)):
        sizes = known[s][0]
        client_silo += [s] * len(sizes)
        if s not in bundles:
            shards += [torch.full((n,), -1, dtype=torch.long) for n in sizes]
            continue
        b = bundles[s]
        shards += [p.cpu() + train_offset for p in shards_of[s]]
        test_rows[s] = torch.arange(test_offset, test_offset + len(b.test_y))
        train_offset += len(b.train_y)
        test_offset += len(b.test_y)
        train_x.append(b.train_x)
        train_y.append(b.train_y)
        test_x.append(b.test_x)
        test_y.append(b.test_y)
        labels.append(b.labels_for_partition)
    width = max(len(h) for v in known.values() for h in v[1])
    width = max(width, num_classes if first.partition_labels is None else 0)
    histograms = torch.tensor(
        [h + [0] * (width - len(h)) for s in range(len(specs)) for h in known[s][1]]
    )
    data = replace(
        first,
        train_x=torch.cat(train_x),
        train_y=torch.cat(train_y),
        test_x=torch.cat(test_x),
        test_y=torch.cat(test_y),
        num_classes=num_classes,
        name=f"{first.name} ({len(specs)} silos)",
        client_indices=None,
        client_names=None,
        test_client_indices=None,
        partition_labels=None if first.partition_labels is None else torch.cat(labels),
        stats=None,
    )
    return data, shards, Silos(client_silo, test_rows, rank_of_silo), histograms


def _exchange(
    mine: dict[int, tuple[list[int], list[list[int]], int]],
    specs: list[dict[str, Any]],
    rank_of_silo: list[int],
) -> dict[int, tuple[list[int], list[list[int]], int]]:
    """Every silo's (client sizes, label histograms, classes), each from the rank serving
    it: first an int64 [clients, labels, classes] row per rank, checked and capped, then
    one int64 [clients, 1 + labels] block per rank (sizes, then histograms), padded to the
    largest so that all ranks send the same shape."""
    ((silo, (sizes, histograms, classes)),) = mine.items()
    width = max((len(h) for h in histograms), default=1)
    world = dist.get_world_size()
    shapes = [torch.zeros(3, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor([len(sizes), width, classes], dtype=torch.int64))
    announced = [[int(v) for v in row] for row in shapes]
    for rank, (clients, labels, num_classes) in enumerate(announced):
        s = rank_of_silo.index(rank)
        expected = specs[s].get("num_clients")
        problem = None
        if expected is not None and clients != expected:
            problem = f"{clients} clients; data.silos.{s}.num_clients is {expected}"
        elif not 1 <= clients <= MAX_SILO_CLIENTS:
            problem = f"{clients} clients (1 to {MAX_SILO_CLIENTS} allowed)"
        elif not 1 <= labels <= MAX_LABELS:
            problem = f"label histograms {labels} wide (1 to {MAX_LABELS} allowed)"
        elif not 1 <= num_classes <= MAX_CLASSES:
            problem = f"{num_classes} classes (1 to {MAX_CLASSES} allowed)"
        if problem is not None:
            raise DataError(f"distributed: rank {rank} (silo {s}) announced {problem}")
    rows = max(a[0] for a in announced)
    cols = 1 + max(a[1] for a in announced)
    if rows * cols * world > MAX_HISTOGRAM_VALUES:
        raise DataError(
            f"distributed: the silos announced {rows} clients x {cols - 1} labels a rank, more "
            f"than the {MAX_HISTOGRAM_VALUES} values allowed"
        )
    block = torch.zeros(rows, cols, dtype=torch.int64)
    block[: len(sizes), 0] = torch.tensor(sizes, dtype=torch.int64)
    for i, h in enumerate(histograms):
        block[i, 1 : 1 + len(h)] = torch.tensor(h, dtype=torch.int64)
    blocks = [torch.zeros_like(block) for _ in range(world)]
    dist.all_gather(blocks, block)
    known = {}
    for rank, (clients, labels, num_classes) in enumerate(announced):
        s = rank_of_silo.index(rank)
        part = blocks[rank][:clients, : 1 + labels]
        bad = (part < 0).any(dim=1) | (part[:, 1:].sum(dim=1) != part[:, 0])
        if bool(bad.any()):
            client = int(bad.nonzero()[0])
            raise DataError(
                f"distributed: rank {rank} (silo {s}) sent client {client} of its silo a size "
                f"{int(part[client, 0])} and a label histogram that do not agree (or are negative)"
            )
        if bool(blocks[rank][clients:].any()) or bool(blocks[rank][:, 1 + labels :].any()):
            raise DataError(
                f"distributed: rank {rank} (silo {s}) sent values beyond the "
                f"{clients} x {labels} it announced"
            )
        known[s] = (part[:, 0].tolist(), part[:, 1:].tolist(), num_classes)
    known[silo] = mine[silo]
    return known
