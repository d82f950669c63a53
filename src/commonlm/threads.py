"""How many threads PyTorch gets on CPU: the CPUs this process may use that other processes leave free.

PyTorch's OpenMP threads wait for each other at the end of every parallel operation, spinning. When another
process holds one of the cores (a second training run, a test suite), the thread that lost its core stalls the whole
team for a scheduler time slice at each of the hundreds of such barriers in a step. On our 2-core machine a training
step with 2 threads then ran up to 8x slower than with 1 (66x once; BENCHMARKS.md, bench/contention.py), while on a
quiet machine 2 threads were 1.4-1.5x faster. So a training run counts the CPUs it may use (affinity mask, cgroup
quota, OMP_NUM_THREADS), measures how many of them other processes keep busy (/proc/stat, less its own CPU time),
gives PyTorch the rest, and looks again every few seconds. The thread count did not change the losses here (bit for
bit, 1 and 2 threads, fp32 and bf16), so a resumed run still repeats the uninterrupted one. A passive OpenMP wait
policy was measured too and not chosen: it cannot change inside a process, and costs 0.53x on a quiet machine.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers) and by
    OMP_NUM_THREADS when set."""
    n = len(_allowed_cpus()) or os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return n


def _allowed_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per period that this process's cgroup (v2) may use, or None for no limit."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]  # "0::/path" under cgroup v2
        path = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        for directory in (path, *path.parents):  # the limit may be set on a parent
            limit = directory / "cpu.max"
            if limit.is_file():
                quota, period = limit.read_text().split()
                if quota != "max":
                    return int(quota) / int(period)
            if directory == Path("/sys/fs/cgroup"):
                break
    except (OSError, IndexError, ValueError):
        pass
    return None


_now, _own_cpu = time.monotonic, time.process_time  # wall and this process's CPU seconds (tests stand in for them)


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of these CPUs since boot (/proc/stat; steal time counts as busy), None without."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu"):
                    break  # the cpu lines come first
                if name == "cpu" or int(name[3:]) not in cpus:
                    continue
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                total += user + nice + system + idle + iowait + irq + softirq + steal
                busy += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


class ThreadGovernor:
    """Keeps torch's intra-op threads at the CPUs that other processes leave free, at most `cap`.

    Call `update()` between steps: at most every `every` seconds it measures, over the time since the last look, how
    many CPUs other processes kept busy, sets torch's threads to the CPUs left (at least 1) and returns the new count
    when it changed (else None). Without /proc/stat (not Linux) it stays at `cap`.
    """

    def __init__(self, cap: int, every: float = 5.0):
        self.cap, self.every = max(1, cap), every
        self.cpus = _allowed_cpus()
        self.threads = self.cap
        self.others = 0.0  # CPUs other processes used in the last window
        self._mark = self._read()

    def _read(self) -> tuple[float, float, tuple[int, int]] | None:
        ticks = _cpu_ticks(self.cpus)
        return None if ticks is None else (_now(), _own_cpu(), ticks)

    def update(self, force: bool = False) -> int | None:
        """force: look now, over whatever time has passed (at least 0.1 s: it waits for the rest)."""
        if self._mark is None:
            return None
        if force:
            time.sleep(max(0.0, 0.1 - (_now() - self._mark[0])))
        elif _now() - self._mark[0] < self.every:
            return None
        now = self._read()
        if now is None:
            return None
        (t0, cpu0, (busy0, total0)), (t1, cpu1, (busy1, total1)) = self._mark, now
        if total1 <= total0 or t1 <= t0:
            return None  # the clock ticks have not moved yet: keep the window open
        self._mark = now
        busy_cpus = len(self.cpus) * (busy1 - busy0) / (total1 - total0)
        self.others = max(0.0, busy_cpus - (cpu1 - cpu0) / (t1 - t0))
        threads = min(self.cap, max(1, round(len(self.cpus) - self.others)))
        if threads == self.threads:
            return None
        self.threads = threads
        torch.set_num_threads(threads)
        return threads

    @property
    def quiet(self) -> bool:
        """Other processes used less than a fifth of a CPU in the last window."""
        return self.others < 0.2
