"""Process measurements for the speed benchmark: memory of a process tree and process age.

Every runner is measured the same way, from outside: bench.py samples the proportional set
size (PSS) of the child and all its descendants while it runs. PSS splits each shared page
among the processes that map it, so summing it over a tree (Flower's Ray workers share
libraries and the object store) does not count shared memory several times, as summing RSS
does. Linux only (reads /proc); standard library only, so the Flower venv can import it too.

Reading a process's PSS makes the kernel walk its page tables (10-20 ms for a process of
~800 MB), which at 5 reads a second per process would slow the measured run, and a tree of
many processes (Flower's) more than a single one. So the sampler reads each process's RSS
(cheap) every tick and its PSS every 2 s, or sooner when its RSS has grown by more than 2%
since the last PSS read; in between, a process counts as its last PSS plus its RSS growth
since then. Measured on Flower's tree of 11 processes: ~50 ms of CPU a second (vs ~155 ms
reading every PSS every tick).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PROC = Path("/proc")


def process_age_s() -> float:
    """Seconds since the kernel started this process (interpreter start-up and imports count).

    Runners report their set-up time (process start to the start of round 1) with it.
    """
    started = int(_stat_fields("self")[19])  # field 22, starttime: clock ticks since boot
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """RSS of one process in kB from /proc/PID/statm (cheap; 0 if it has gone)."""
    try:
        pages = int((PROC / str(pid) / "statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def pss_kb(pid: int) -> int:
    """PSS of one process in kB (0 if it has gone or cannot be read)."""
    try:
        with open(PROC / str(pid) / "smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _stat_fields(pid: int | str) -> list[str]:
    """Fields 3.. of /proc/PID/stat (after the parenthesised command name, which may hold
    spaces); raises OSError if the process has gone."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants, found through the parent id in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry.name)[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, its identity."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


class TreeMemorySampler:
    """Peak PSS of a process tree, sampled in a background thread every `interval_s`.

    Keeps the peak of the tree's sum and the peak of its largest single process. The tree is
    re-read every `scan_every_s`; a process once seen in it stays counted while it lives,
    even if its parent exits first and it is re-parented (Ray's workers outlive the raylet
    by a moment at shutdown). PSS reads are rationed as the module docstring says::

        with TreeMemorySampler(proc.pid) as sampler:
            proc.wait()
        sampler.peaks_mb()
    """

    def __init__(
        self,
        pid: int,
        interval_s: float = 0.2,
        scan_every_s: float = 1.0,
        pss_every_s: float = 2.0,
        rss_growth: float = 0.02,
    ) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.scan_every_s = scan_every_s
        self.pss_every_s = pss_every_s
        self.rss_growth = rss_growth
        self.peak_sum_kb = 0
        self.peak_max_kb = 0
        self._members: dict[int, int | None] = {}  # pid -> start ticks
        self._last_read: dict[int, tuple[int, int, float]] = {}  # pid -> (PSS, RSS, when)
        self._next_scan = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one sample now and update the peaks."""
        now = time.monotonic()
        if now >= self._next_scan:
            self._scan()
            self._next_scan = now + self.scan_every_s
        sizes = [self._pss_estimate(pid, now) for pid in self._members]
        self.peak_sum_kb = max(self.peak_sum_kb, sum(sizes))
        self.peak_max_kb = max(self.peak_max_kb, max(sizes, default=0))

    def _scan(self) -> None:
        """Add the tree's new processes; drop those gone (or whose pid names another)."""
        for pid in process_tree(self.pid):
            self._members.setdefault(pid, start_ticks(pid))
        self._members = {
            p: t for p, t in self._members.items() if t is not None and start_ticks(p) == t
        }
        self._last_read = {p: r for p, r in self._last_read.items() if p in self._members}

    def _pss_estimate(self, pid: int, now: float) -> int:
        """PSS of `pid` in kB: read afresh when due (see the module docstring), else the
        last reading plus the RSS growth since; 0 once the process has gone."""
        rss = rss_kb(pid)
        if rss == 0:
            return 0
        last = self._last_read.get(pid)
        if (
            last is None
            or now - last[2] >= self.pss_every_s
            or rss > last[1] * (1 + self.rss_growth)
        ):
            pss = pss_kb(pid)
            self._last_read[pid] = (pss, rss, now)
            return pss
        return last[0] + max(0, rss - last[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks_mb(self) -> dict[str, float]:
        """`{"peak_pss_sum_mb": ..., "peak_pss_max_mb": ...}` (MiB)."""
        return {
            "peak_pss_sum_mb": self.peak_sum_kb / 1024,
            "peak_pss_max_mb": self.peak_max_kb / 1024,
        }
