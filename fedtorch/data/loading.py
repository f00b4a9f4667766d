"""Inputs read through a ``torch.utils.data.DataLoader`` instead of held as one tensor.

``data.in_memory=false`` keeps a map-style ``Dataset`` as it is: each client trains through a
DataLoader over its own index subset, so data that does not fit in memory can be used and
the dataset's per-sample transforms (augmentation) run on every draw. Only the labels are
held in memory (partitioning and FedAvg weights need them).

The batches are the ones the in-memory path would draw: the client's schedule (indices from
a generator seeded by (seed, round, client)) is handed to the DataLoader as its batch
sampler. Randomness inside the transforms comes from a seed per batch, derived from (seed,
round, client, step), that the worker applies before building the batch; so the numbers do
not depend on ``num_workers``, on which worker built a batch, or on an interruption.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedtorch.errors import ConfigError


class _SeededBatches(Dataset):
    """Wraps the user's dataset: a key ``(seed, index)`` seeds torch and ``random`` with
    ``seed`` (when not None) before the sample is read, without touching the caller's
    generators. ``__getitems__`` does so once per batch, which the DataLoader calls in the
    worker that builds the batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int | None, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int | None, int]]) -> list[Any]:
        seed = keys[0][0] if keys else None
        if seed is None:
            return [self.dataset[i] for _, i in keys]
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return [self.dataset[i] for _, i in keys]
            finally:
                random.setstate(py_state)


class _Schedule:
    """A batch sampler whose batches are set before each pass (one DataLoader, with its
    persistent workers, serves every client and every evaluation)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int | None, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int | None, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DatasetInputs:
    """A dataset's inputs, read batch by batch through a DataLoader.

    Stands where the in-memory path has its input tensor: ``len``, ``shape``, ``device`` and
    ``inputs[rows]`` (read in this process, for small probes) work as on a tensor; training
    and evaluation draw batches with :meth:`batches`.

    Args:
        dataset: a map-style dataset yielding ``(x, y)``.
        num_workers: DataLoader worker processes (0: read in this process). Kept alive for
            the whole run.
        pin_memory: pin host batches before copying them to a CUDA device (ignored on CPU).
        device: where batches go.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.device = torch.device(device)
        self._len = len(dataset)  # type: ignore[arg-type]
        self._loader: DataLoader | None = None
        self._schedule = _Schedule()
        self._sample_shape: tuple[int, ...] | None = None

    def configure(self, num_workers: int, pin_memory: bool) -> DatasetInputs:
        """Set the DataLoader's ``num_workers`` and ``pin_memory`` (the ``data.*`` keys)."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError("data.num_workers", f"must be an integer >= 0, got {num_workers!r}")
        if not isinstance(pin_memory, bool):
            raise ConfigError("data.pin_memory", f"must be true or false, got {pin_memory!r}")
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._loader = None
        return self

    def to(self, device: torch.device | str) -> DatasetInputs:
        """Send batches to ``device`` from now on (the dataset itself stays where it is)."""
        self.device = torch.device(device)
        self._loader = None
        return self

    def __len__(self) -> int:
        return self._len

    @property
    def shape(self) -> torch.Size:
        if self._sample_shape is None:
            self._sample_shape = tuple(self[:1].shape[1:])
        return torch.Size((self._len, *self._sample_shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows: slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The inputs of ``rows``, read in this process (for probes of a few rows)."""
        if isinstance(rows, slice):
            rows = range(*rows.indices(self._len))
        elif isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        with torch.random.fork_rng(devices=[]):
            xs = [torch.as_tensor(self.dataset[int(i)][0]) for i in rows]
        return torch.stack(xs).to(self.device)

    def batches(
        self, rows: Sequence[torch.Tensor], seeds: Sequence[int | None] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` on the device for each index tensor of ``rows``, in order.

        ``seeds[s]`` seeds the transforms of batch ``s`` (None: leave them unseeded).
        """
        seeds = seeds if seeds is not None else [None] * len(rows)
        self._schedule.batches = [
            [(seed, i) for i in batch.tolist()] for batch, seed in zip(rows, seeds)
        ]
        non_blocking = self.device.type == "cuda"
        for x, y in self._dataloader():
            yield (
                torch.as_tensor(x).to(self.device, non_blocking=non_blocking),
                torch.as_tensor(y).to(self.device, non_blocking=non_blocking),
            )

    def in_order(
        self, batch_size: int, rows: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches of ``batch_size`` over ``rows`` (default: every row), in order.

        For evaluations. The dataset's transforms still run (a training set's augmentation
        too), seeded by the batch's position, so the result is the same on every call.
        """
        rows = torch.arange(self._len) if rows is None else rows.cpu()
        batches = list(rows.split(batch_size))
        return self.batches(batches, seeds=list(range(len(batches))))

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                _SeededBatches(self.dataset),
                batch_sampler=self._schedule,
                num_workers=workers,
                pin_memory=self.pin_memory and self.device.type == "cuda",
                persistent_workers=workers > 0,
            )
        return self._loader


def in_order(
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int,
    rows: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of ``batch_size`` over ``rows`` (default: all), for evaluation:
    slices of the tensors in memory, or DataLoader batches of a :class:`DatasetInputs`."""
    if isinstance(x, DatasetInputs):
        yield from x.in_order(batch_size, rows)
        return
    if rows is not None:
        rows = rows.to(x.device)
        x, y = x[rows], y[rows]
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every sample's label: the dataset's ``targets`` (torchvision's convention) when it
    has them, else read sample by sample (one pass over the data)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        return torch.as_tensor(targets).long()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))]).long()  # type: ignore[arg-type]
