"""CPU threads follow what other processes leave free; the measured matmul peak is remembered."""

import json

import pytest
import torch

import commonlm.threads as threads_mod
from commonlm.threads import ThreadGovernor, available_cpus
from commonlm.train import metrics
from commonlm.train.trainer import train
from tests.train.test_trainer import small_config


@pytest.fixture
def two_cpus(monkeypatch):
    """A process that may run on CPUs 0 and 1, no cgroup quota, no OMP_NUM_THREADS; torch's threads restored."""
    monkeypatch.setattr(threads_mod, "_allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads_mod, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeClock:
    """/proc/stat, this process's CPU time and the wall clock, advanced by hand (100 ticks per CPU-second)."""

    def __init__(self, monkeypatch):
        self.t = self.cpu = 0.0
        self.busy = self.total = 0
        monkeypatch.setattr(threads_mod, "_cpu_ticks", lambda cpus: (self.busy, self.total))
        monkeypatch.setattr(threads_mod, "_now", lambda: self.t)
        monkeypatch.setattr(threads_mod, "_own_cpu", lambda: self.cpu)

    def advance(self, seconds: float, busy_cpus: float, ours: float, cpus: int = 2) -> None:
        self.t += seconds
        self.cpu += ours * seconds
        self.total += round(100 * cpus * seconds)
        self.busy += round(100 * busy_cpus * seconds)


def test_available_cpus_counts_affinity_quota_and_omp_num_threads(two_cpus, monkeypatch):
    assert available_cpus() == 2
    monkeypatch.setattr(threads_mod, "_cgroup_cpu_quota", lambda: 1.5)  # a container allowed 1.5 CPUs
    assert available_cpus() == 1
    monkeypatch.setattr(threads_mod, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert available_cpus() == 1


def test_governor_gives_torch_the_cpus_other_processes_leave_free(two_cpus, monkeypatch):
    clock = FakeClock(monkeypatch)
    governor = ThreadGovernor(cap=2, every=5.0)
    clock.advance(1.0, busy_cpus=2.0, ours=1.0)  # we use one CPU, another process the other
    assert governor.update(force=True) == 1 and torch.get_num_threads() == 1
    assert governor.others == pytest.approx(1.0) and not governor.quiet
    clock.advance(2.0, busy_cpus=0.5, ours=0.5)
    assert governor.update() is None  # not yet: it looks every 5 s
    clock.advance(4.0, busy_cpus=1.0, ours=1.0)  # the other process has gone (this window: 6 s)
    assert governor.update() == 2 and torch.get_num_threads() == 2 and governor.quiet
    clock.advance(6.0, busy_cpus=2.0, ours=1.9)
    assert governor.update() is None  # still free: nothing to change


def test_a_run_on_a_busy_machine_trains_with_the_free_cpu_only(two_cpus, monkeypatch, byte_data, tmp_path):
    clock = FakeClock(monkeypatch)
    real_init = ThreadGovernor.__init__

    def init_then_busy(self, *args, **kwargs):  # between the governor's first look and its decision: busy
        real_init(self, *args, **kwargs)
        clock.advance(1.0, busy_cpus=2.0, ours=0.8)

    monkeypatch.setattr(ThreadGovernor, "__init__", init_then_busy)
    monkeypatch.setenv("COMMONLM_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(2)
    train(small_config(byte_data, "train.threads=0", "train.max_steps=2"), tmp_path / "r")  # 0: automatic
    assert torch.get_num_threads() == 1
    assert not (tmp_path / "cache" / "peak_flops.json").exists()  # a busy machine's peak is not remembered


def test_peak_flops_is_measured_once_per_device_dtype_and_threads(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda device, dtype: calls.append(dtype) or 1e12)
    monkeypatch.setenv("COMMONLM_CACHE_DIR", str(tmp_path))
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    assert metrics.peak_flops(cpu, torch.float32) == 1e12
    assert metrics.peak_flops(cpu, torch.float32) == 1e12 and len(calls) == 1  # read back, not measured
    assert metrics.peak_flops(cpu, torch.bfloat16) == 1e12 and len(calls) == 2
    assert metrics.peak_flops(cpu, torch.float16, remember=False) == 1e12
    assert metrics.peak_flops(cpu, torch.float16) == 1e12 and len(calls) == 4  # the unremembered one again
    # asked for more threads than torch runs now: scaled in proportion, and not written down
    assert metrics.peak_flops(cpu, torch.float32, threads=2 * threads) == 2e12
    assert metrics.peak_flops(cpu, torch.float32, threads=2 * threads) == 2e12 and len(calls) == 6


def test_a_peak_below_the_fewer_thread_one_is_neither_trusted_nor_kept(monkeypatch, tmp_path):
    """A 2-thread figure measured while another job held a core (67 GFLOP/s against 107 with 1 thread) made MFU
    read 130%: such a figure is measured again and, if still low, replaced by the 1-thread one scaled up."""
    measured = []
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda device, dtype: measured.pop(0))
    monkeypatch.setenv("COMMONLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_device_name", lambda device: "CPU X")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, version = torch.device("cpu"), torch.__version__
    one, two = f"CPU X | float32 | 1 threads | torch {version}", f"CPU X | float32 | 2 threads | torch {version}"
    (tmp_path / "peak_flops.json").write_text(json.dumps({one: 100e9, two: 60e9}))
    measured[:] = [70e9]  # busy again: still below the 1-thread figure, which stands in scaled up
    assert metrics.peak_flops(cpu, torch.float32) == 200e9
    assert json.loads((tmp_path / "peak_flops.json").read_text())[two] == 60e9  # not written over with 70
    measured[:] = [190e9]  # quiet: the measurement stands and is kept
    assert metrics.peak_flops(cpu, torch.float32) == 190e9
    assert json.loads((tmp_path / "peak_flops.json").read_text())[two] == 190e9
    assert metrics.peak_flops(cpu, torch.float32) == 190e9 and measured == []  # read back
    # another dtype's or torch's figures are no floor
    other = f"CPU X | bfloat16 | 1 threads | torch {version}"
    (tmp_path / "peak_flops.json").write_text(json.dumps({other: 900e9, two: 60e9}))
    assert metrics.peak_flops(cpu, torch.float32) == 60e9
