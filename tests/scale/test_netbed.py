"""The swarm across hosts: a lighthouse and two volunteers, each on its own host of the namespace test bed
(tests/scale/netbed.py), over links rate-limited to 20 mbit each way. Where no bed can be made (not root, no
iproute2) these skip; the swarm's loopback tests (test_swarm.py, inside `unshare -n`) still run."""

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from tests.procs import started
from tests.scale.netbed import SUBNET, netbed, netbed_unavailable
from tests.scale.test_swarm import PER_PROCESS_S, SMALL, _log_tail, _syncs, _weights, local_data  # noqa: F401

UNAVAILABLE = netbed_unavailable()
needs_netbed = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no namespace test bed: {UNAVAILABLE}")
RATE_MBIT = 20
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# one host listens and takes `n` bytes, another sends them: what a transfer costs over the bed's links
RECEIVE = ("import socket, sys\ns = socket.create_server((sys.argv[1], 5001)); print('ready', flush=True)\n"
           "c, _ = s.accept(); got = 0\nwhile (chunk := c.recv(1 << 16)): got += len(chunk)\nprint(got)")
SEND = "import socket, sys\nc = socket.create_connection((sys.argv[1], 5001)); c.sendall(bytes(int(sys.argv[2])))"


def _addresses_here() -> str:
    return subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True).stdout


@needs_netbed
def test_the_bed_joins_its_hosts_at_the_rate_and_leaves_nothing_behind():
    before = _addresses_here()
    assert f"{SUBNET}." not in before
    size = 5_000_000  # 2 s at 20 mbit; a veth without the limit moves it in milliseconds
    with netbed(3, rate=f"{RATE_MBIT}mbit") as bed:
        names = bed.namespaces()
        assert _addresses_here() == before  # nothing was added to this machine's own interfaces
        receiver, sender = bed.hosts[2], bed.hosts[1]
        with started(receiver.cmd([sys.executable, "-c", RECEIVE, receiver.address]), stdout=subprocess.PIPE,
                     text=True) as listening:
            assert listening.stdout.readline().strip() == "ready"
            began = time.perf_counter()
            subprocess.run(sender.cmd([sys.executable, "-c", SEND, receiver.address, str(size)]), check=True,
                           timeout=60)
            out, _ = listening.communicate(timeout=60)
            seconds = time.perf_counter() - began
        assert int(out) == size
        # a lower bound only (a busy machine is slower, never faster): the bytes did cross the limited link
        assert seconds >= 0.8 * size * 8 / (RATE_MBIT * 1e6), seconds
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    assert not set(names) & set(left)
    assert _addresses_here() == before


@pytest.mark.slow
@needs_netbed
def test_volunteers_on_two_hosts_hold_the_same_global_weights_over_20_mbit_links(local_data, tmp_path):  # noqa: F811
    lighthouse_address = f"{SUBNET}.1:29510"
    runs = [tmp_path / "a", tmp_path / "b"]
    with netbed(3, rate=f"{RATE_MBIT}mbit") as bed:
        lighthouse = [sys.executable, "-m", "commonlm", "swarm", "lighthouse", "--bind", lighthouse_address,
                      "--min-replicas", "2", "--join-timeout-ms", "5000", "--heartbeat-timeout-ms", "2000"]
        with open(tmp_path / "lighthouse.log", "w") as log, \
                started(bed.hosts[0].cmd(lighthouse), stdout=log, stderr=subprocess.STDOUT, env=ENV):
            exits = _run_volunteers(bed.hosts[1:], local_data[:2], runs)
    logs = "".join(_log_tail(Path(f"{run}.log")) for run in runs) + _log_tail(tmp_path / "lighthouse.log")
    assert exits == [0, 0], logs

    for run, host in zip(runs, bed.hosts[1:]):
        syncs = _syncs(run)
        assert [(r["step"], r["swarm_sync"], r["swarm_committed"], r["swarm_volunteers"]) for r in syncs] == [
            (3, 1, True, 2), (6, 2, True, 2)], logs
        # ... the volunteer on this host, reached at this host's address (the lighthouse's quorum lists it)
        assert f'store_address: "{host.address}:' in _log_tail(tmp_path / "lighthouse.log"), logs
        # each sync's all-reduce went over the 20 mbit link: it took at least the time of its bytes there
        for record in syncs:
            assert record["swarm_sync_s"] >= 0.8 * record["swarm_sent_bytes"] * 8 / (RATE_MBIT * 1e6), record
        print(f"{run.name} (host {host.address}) sync seconds: {[r['swarm_sync_s'] for r in syncs]}, "
              f"sent {[r['swarm_sent_bytes'] for r in syncs]} bytes")
    for step_dir in ("checkpoints/step_000003", "final"):
        wa, wb = _weights(runs[0] / step_dir), _weights(runs[1] / step_dir)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), step_dir
    # (and they trained on different data: their local losses differ)
    assert _losses(runs[0]) != _losses(runs[1])


def _run_volunteers(hosts, data_dirs, runs) -> list[int | None]:
    """Start one volunteer per host, each with its own data, and wait for all of them (bounded); their exit codes."""
    with ExitStack() as stack:
        procs = []
        for host, data, run in zip(hosts, data_dirs, runs):
            log = stack.enter_context(open(f"{run}.log", "w"))
            cmd = [sys.executable, "-m", "commonlm", "train", "--config", "tiny", "--data", data, "--out", run,
                   "--swarm", f"{SUBNET}.1:29510", "--set", *SMALL, "train.max_steps=6"]
            procs.append(stack.enter_context(started(host.cmd(list(map(str, cmd))), stdout=log,
                                                     stderr=subprocess.STDOUT, env=ENV)))
        deadline = time.monotonic() + PER_PROCESS_S
        exits = []
        for proc in procs:
            try:
                exits.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                exits.append(None)
        return exits


def _losses(run: Path) -> list[float]:
    from commonlm.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run) if "loss" in r]
