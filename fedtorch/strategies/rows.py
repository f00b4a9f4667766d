"""A round's update rows, for the rules that need every row (median, Krum, Bulyan, ...).

Mean-based strategies never hold rows: they keep running sums. Rules that compare updates
with each other need the [K, P] matrix, which for a large model and cohort does not fit in
memory. :class:`RowStore` keeps it in memory while it takes at most half the budget
(``aggregation.memory_budget_mb``) and otherwise spills it to a file in the run folder;
the rules then work on column blocks sized so that the rows kept in memory and the
blocks' temporaries together stay within the budget.
Rows are written with ``pwrite`` and read back in column blocks with ``pread``, so the
process's resident memory stays within the budget however large the cohort: the file's
pages live in the operating system's page cache, not in the process. :meth:`matrix` maps
the whole file (for a user's rule written over the full matrix); the built-in rules use
:meth:`column_blocks`, :meth:`gram` and :meth:`mean_of` instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fedtorch.logging.files import private_file

# A column block of K rows is sized so the rule's temporaries stay within the budget:
# the block read from disk, a float64 copy and its square for distances, or sorted values
# and int64 indices for medians: about 6x the block's float32 bytes.
BLOCK_OVERHEAD = 6


class RowStore:
    """Up to ``capacity`` rows of length ``size``, in memory or in a file.

    Args:
        capacity: most rows the round can add (the number of clients asked to train).
        size: P, the length of a row.
        budget_bytes: what the rows (in memory while they take at most half of it) and
            the rules' working blocks may use; None: in memory, one block.
        folder: where the spill file goes (``rows.bin``); needed when the matrix may spill.
        device: where in-memory rows live and where blocks are handed out.
        dtype: the rows' dtype (the flat layout's).
    """

    def __init__(
        self,
        capacity: int,
        size: int,
        budget_bytes: int | None = None,
        folder: Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.capacity, self.size, self.device = capacity, size, torch.device(device)
        self.dtype, self.budget_bytes = dtype, budget_bytes
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.count = 0
        self.spilled = (
            budget_bytes is not None and 2 * capacity * size * self.itemsize > budget_bytes
        )
        self._memory: torch.Tensor | None = None
        self._fd: int | None = None
        if self.spilled:
            if folder is None:
                raise ValueError("a RowStore that may spill needs a folder")
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.path = Path(folder) / "rows.bin"
            self._fd = private_file(self.path)  # clients' updates: owner-only

    @classmethod
    def of(cls, rows: torch.Tensor) -> RowStore:
        """An in-memory store holding the [K, P] matrix ``rows`` (no copy)."""
        store = cls(rows.shape[0], rows.shape[1], device=rows.device, dtype=rows.dtype)
        store._memory = rows
        store.count = rows.shape[0]
        return store

    def __len__(self) -> int:
        return self.count

    def append(self, row: torch.Tensor) -> None:
        """Add one [P] row (copied; the caller may reuse ``row``)."""
        if self.count >= self.capacity:
            raise ValueError(f"RowStore is full ({self.capacity} rows)")
        if not self.spilled:
            if self._memory is None:  # allocated on first use: mean-based rules never add
                self._memory = torch.empty(
                    self.capacity, self.size, dtype=self.dtype, device=self.device
                )
            self._memory[self.count].copy_(row)
        else:
            data = row.detach().to("cpu", self.dtype).contiguous().numpy()
            os.pwrite(self._fd, data.tobytes(), self.count * self.size * self.itemsize)
        self.count += 1

    def matrix(self) -> torch.Tensor:
        """All rows as one [K, P] tensor (memory-mapped when spilled)."""
        if not self.spilled:
            if self._memory is None:
                return torch.empty(0, self.size, dtype=self.dtype, device=self.device)
            return self._memory[: self.count]
        mapped = np.memmap(
            self.path, dtype=self._np_dtype, mode="r+", shape=(self.count, self.size)
        )
        return torch.from_numpy(mapped)

    def block_width(self, rows: int | None = None) -> int:
        """Columns per block so that ``rows`` rows of it and the rule's temporaries fit the
        budget (half of it when the rows themselves take the other half in memory)."""
        rows = self.count if rows is None else rows
        if self.budget_bytes is None or not rows:
            return max(self.size, 1)
        available = self.budget_bytes if self.spilled else self.budget_bytes // 2
        return max(1, available // (BLOCK_OVERHEAD * self.itemsize * rows))

    def column_blocks(
        self, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(columns, [k, w] block)`` pairs covering every column, for rows ``indices``
        (all rows in order by default). Without a budget one block holds everything. In
        memory a block is a view; spilled, the blocks share one buffer, so each is valid
        only until the next is read."""
        chosen = list(range(self.count)) if indices is None else list(indices)
        width = self.block_width(len(chosen))
        if not self.spilled:
            rows = self.matrix()
            for start in range(0, self.size, width):
                columns = slice(start, min(start + width, self.size))
                yield columns, rows[:, columns] if indices is None else rows[chosen, columns]
            return
        buffer = np.empty((len(chosen), width), dtype=self._np_dtype)
        for start in range(0, self.size, width):
            end = min(start + width, self.size)
            block = buffer[:, : end - start]
            for i, row in enumerate(chosen):
                offset = (row * self.size + start) * self.itemsize
                read = os.preadv(self._fd, [memoryview(block[i])], offset)
                if read != (end - start) * self.itemsize:
                    raise OSError(f"short read from {self.path}")
            yield slice(start, end), torch.from_numpy(block).to(self.device)

    def gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, sq)``: the [K, K] Gram matrix of the rows and their squared norms [K], in
        float64, summed over column blocks."""
        gram = torch.zeros(self.count, self.count, dtype=torch.float64, device=self.device)
        sq = torch.zeros(self.count, dtype=torch.float64, device=self.device)
        for _, block in self.column_blocks():
            u = block.double()
            gram += u @ u.T
            sq += (u * u).sum(dim=1)
        return gram, sq

    def mean_of(self, indices: Sequence[int]) -> torch.Tensor:
        """The mean [P] of the rows ``indices``, computed block by block."""
        out = torch.empty(self.size, dtype=self.dtype, device=self.device)
        for columns, block in self.column_blocks(indices):
            out[columns] = block.mean(dim=0)
        return out

    @property
    def _np_dtype(self) -> np.dtype:
        return torch.empty(0, dtype=self.dtype).numpy().dtype

    def close(self) -> None:
        """Release the rows (and delete the spill file)."""
        self._memory = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)
