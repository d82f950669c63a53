"""What a run reports: console lines or a progress bar, metrics.jsonl, TensorBoard, and loss.png."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from commonlm.utils import atomic_write_bytes, atomic_write_json, console


class Metrics:
    """Main-process-only sink for training and evaluation metrics."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.progress = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but a hand-made environment may lack it
            console.print("[yellow]tensorboard is not installed: no event files (pip install tensorboard)[/]")
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, step)
        if line:
            if self.progress is not None:
                self.progress.update(self.task, completed=record["step"], info=line)
            else:
                console.print(line)

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


def plot_losses(run_dir: Path) -> Path | None:
    """Write loss.png (train and validation loss against steps) from metrics.jsonl."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = Path(run_dir) / "loss.png"
    atomic_write_bytes(out, buf.getvalue())
    return out


def peak_flops(device: torch.device, dtype: torch.dtype, threads: int = 0, remember: bool = True) -> float:
    """The matmul peak (measure_peak_flops) of `threads` CPU threads (0: torch's current count) or of the GPU.

    Measured once per device, dtype, thread count and torch version, then read from
    $COMMONLM_CACHE_DIR/peak_flops.json (default ~/.cache/commonlm): measuring took 0.2-1.3 s at every start on our
    2-core CPU, more on a busy one. A measurement is not written down when remember=False (a busy machine reads
    low) or when torch runs fewer threads than `threads`; then it is scaled up in proportion (large matmuls scaled
    1.85-2.0x from 1 to 2 threads here). Delete the file to measure again."""
    current = torch.get_num_threads() if device.type == "cpu" else 0
    threads = threads or current
    key = f"{_device_name(device)} | {str(dtype).replace('torch.', '')} | " + (
        f"{threads} threads | " if device.type == "cpu" else "") + f"torch {torch.__version__}"
    path = Path(os.environ.get("COMMONLM_CACHE_DIR") or Path.home() / ".cache" / "commonlm") / "peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    # more threads never multiply slower than fewer: a figure below a fewer-thread one was taken while another job
    # held a core (MFU then read 130%), so it is neither trusted from the file nor written to it; the fewer-thread
    # figure scaled up in proportion stands in for it
    fewer, fewer_peak = _fewer_threads_peak(known, key, threads) if device.type == "cpu" else (0, 0.0)
    if isinstance(known.get(key), (int, float)) and known[key] > 0 and known[key] >= fewer_peak:
        return float(known[key])
    peak = measure_peak_flops(device, dtype)
    if threads != current:
        peak = peak * threads / current
    if peak < fewer_peak:
        return fewer_peak * threads / fewer
    if threads != current:
        return peak
    if remember:
        try:
            atomic_write_json(path, {**known, key: peak})
        except OSError:  # a read-only home: measure again next time
            pass
    return peak


def _fewer_threads_peak(known: dict, key: str, threads: int) -> tuple[int, float]:
    """The remembered peak of the most threads below `threads` for the same CPU, dtype and torch as `key`, and
    that thread count; (0, 0.0) if none."""
    parts = key.split(" | ")
    best = (0, 0.0)
    for other, value in known.items():
        fields = other.split(" | ")
        if len(fields) != len(parts) or not isinstance(value, (int, float)) or value <= 0:
            continue
        if fields[:2] != parts[:2] or fields[3:] != parts[3:] or not fields[2].endswith(" threads"):
            continue
        n = int(fields[2].split()[0])
        if best[0] < n < threads:
            best = (n, float(value))
    return best


def environment(threads: int | None = None) -> dict[str, str]:
    """Where this process runs and which code it runs: what a run records at its start (run_info.json) and
    a report shows."""
    import subprocess
    import sys

    from commonlm import __version__

    source = Path(__file__).resolve().parents[3]
    try:
        done = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty", "--tags"],
                              capture_output=True, text=True, timeout=10)
        code = f"git {done.stdout.strip()}" if done.returncode == 0 else "not a git checkout"
    except (OSError, subprocess.TimeoutExpired):
        code = "no git here"
    info = {"commonlm": f"{__version__} ({code})", "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(),
            "CPU": f"{_device_name(torch.device('cpu'))}, {threads or torch.get_num_threads()} threads"}
    if torch.cuda.is_available():
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    info["command"] = " ".join(sys.argv)
    return info


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Data-sheet dense bf16 tensor-core FLOP/s (without sparsity) of common GPUs, by a pattern of their CUDA name, the
# first match winning. Our MFU is against the matmul rate measured on the device (what it reaches); other projects
# quote MFU against these rated figures, so GPU figures are given against both. NVL boards: sources disagree.
RATED_BF16_PEAK = {r"NVL": None, r"H100.*PCIe": 756e12, r"H100|H200": 989e12, r"A100": 312e12, r"\bL4\b": 121e12,
                   r"RTX 4090": 165e12}


def rated_peak_flops(name: str) -> float | None:
    """The rated dense bf16 peak of a GPU named `name` (torch.cuda.get_device_name), or None when unknown."""
    return next((peak for pattern, peak in RATED_BF16_PEAK.items() if re.search(pattern, name)), None)


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Matmul FLOP/s this device reaches in `dtype` right now: the denominator of MFU."""
    n = 2048 if device.type == "cpu" else 8192
    # its own generator: a draw from the global one would shift a run's dropout masks by whether the
    # measurement was cached (two fresh runs with dropout differed)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    reps = 3 if device.type == "cpu" else 20
    best = float("inf")
    for _ in range(2):
        torch.mm(a, b)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
