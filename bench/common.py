"""Helpers shared by the benchmarks in bench/: threads, timing, the machine's load, markdown tables.

Not part of the package: the benchmark scripts put this directory on sys.path themselves.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large tensors, as the commonlm CLI sets

import torch  # noqa: E402

from commonlm.utils import human  # noqa: F401  (re-exported for the bench scripts)


def setup_threads(threads: int = 0) -> int:
    """Use all cores (as the trainer does with train.threads=0) unless told otherwise."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Run `step` warmup times untimed, then `steps` times; seconds per timed call."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
