"""Subprocesses in tests: always killed, and waited on by readiness rather than by short deadlines.

On a busy machine (other processes on every core) a server may take a minute to answer and a compile many
minutes, so a test waits for the state it needs (a log line, a file, an answer) and fails early only when the
process it waits on has died. LAST_RESORT_S is the one wall-clock limit: only a hung test ever reaches it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LAST_RESORT_S = 900.0


def commonlm_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "commonlm", *map(str, args)]


@contextmanager
def started(cmd: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """Popen `cmd` in its own process group, and kill the whole group on the way out, whatever happened
    (torchrun's workers and a server's children included)."""
    with subprocess.Popen(cmd, start_new_session=True, **popen_kwargs) as proc:  # closes its pipes, reaps it
        try:
            yield proc
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group is gone already
                pass


def run_captured(cmd: list[str], input: str | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured and the last-resort limit, killing the process group after."""
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    with started(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as proc:
        out, err = proc.communicate(input, timeout=LAST_RESORT_S)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_for(ready: Callable[[], object], what: str, alive: Callable[[], bool] = lambda: True,
             interval: float = 0.1, log: Path | None = None, limit: float = LAST_RESORT_S) -> None:
    """Poll `ready()` until it is true. Fail at once when `alive()` turns false (the process or thread that was
    to get there has ended), and after `limit` seconds otherwise; the end of `log` (its output) goes in the failure."""
    deadline = time.monotonic() + limit
    while not ready():
        why = None
        if not alive():
            if ready():  # it got there and then ended, between the two checks
                return
            why = "the process it waited on has ended"
        elif time.monotonic() > deadline:
            why = f"not there after {limit:.0f} s"
        if why:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"gave up waiting for {what}: {why}\n{tail}")
        time.sleep(interval)


def running(proc: subprocess.Popen) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: object, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run `script` (with `args`) in `nproc` CPU processes under torchrun (gloo over loopback, one thread each)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]
    return run_captured(cmd, env=env)  # torchrun's workers die with it if anything goes wrong
