"""The test helpers for subprocesses kill what they start, children included, and give up early on a dead one."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import running, started, wait_for

# a process that starts a child of its own, says the child's pid, and then waits forever
PARENT = ("import subprocess, sys, time\n"
          "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(3600)\n")


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_started_kills_the_process_and_its_children_when_the_test_fails():
    with pytest.raises(RuntimeError, match="the test failed"):
        with started([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True) as proc:
            child = int(proc.stdout.readline())
            assert alive(proc.pid) and alive(child)
            raise RuntimeError("the test failed")
    assert proc.returncode is not None
    wait_for(lambda: not alive(child), "the child to be gone", interval=0.02, limit=60)  # SIGKILL acts at once


def test_wait_for_gives_up_at_once_when_the_process_has_ended():
    t0 = time.monotonic()
    with started([sys.executable, "-c", "pass"]) as proc:
        with pytest.raises(AssertionError, match="has ended"):
            wait_for(lambda: False, "something that never comes", running(proc))
    assert time.monotonic() - t0 < 60  # not the last-resort limit
