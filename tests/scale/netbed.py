"""Several hosts on one machine, for swarm tests that need a real network between volunteers: each host a Linux
network namespace with one link (a veth pair) to a switch (a bridge in a hub namespace), rate-limited both ways
with `tc tbf` to a home-internet rate.

Why namespaces rather than loopback: on 127.0.0.1 every volunteer shares one address and an unlimited link, so
nothing shows what a sync costs over a real uplink, and a process that binds the wrong address still works. Here
each host has only its own address (10.77.0.i) and a rate-limited link; the machine's own interfaces are never
touched (every device and address is created inside the namespaces, and the veths are made in the hub and
moved straight into their host). It lives in tests/, not in the package: it needs root, changes the machine's
namespaces, and users of a swarm have real machines.

    with netbed(3, rate="20mbit") as bed:
        subprocess.run(bed.hosts[0].cmd(["ping", "-c1", bed.hosts[1].address]))

Teardown is reliable: every process still inside a namespace is killed, then the namespaces are deleted (which
deletes their devices), on leaving the `with`, and at exit for a bed that a crash left behind. Every `ip`/`tc`
call has a time limit. `netbed_unavailable()` says why a bed cannot be made here (not root, no iproute2).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

SUBNET = "10.77.0"  # hosts are .1, .2, ...; a private range, and only ever inside the namespaces
COMMAND_S = 15.0  # the limit of one `ip` or `tc` call
_numbers = itertools.count()
_left_behind: list[NetBed] = []


@dataclass
class Host:
    namespace: str
    address: str

    def cmd(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class NetBed:
    hub: str
    rate: str
    hosts: list[Host] = field(default_factory=list)

    def namespaces(self) -> list[str]:
        return [host.namespace for host in self.hosts] + [self.hub]

    def teardown(self) -> None:
        """Kill what still runs inside, delete the namespaces. Safe to call twice, and on a half-made bed."""
        existing = set(_ip(["netns", "list"], check=False).split())
        for namespace in self.namespaces():
            if namespace not in existing:
                continue
            for pid in _ip(["netns", "pids", namespace], check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip(["netns", "del", namespace], check=False)
        if self in _left_behind:
            _left_behind.remove(self)


def netbed_unavailable() -> str | None:
    """Why a test bed cannot be made on this machine, or None when it can (checked by making a namespace)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (`ip`, `tc`)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (`ip netns add`)"
    probe = NetBed(hub=_prefix() + "probe", rate="")
    try:
        _ip(["netns", "add", probe.hub])
        _ip(["-n", probe.hub, "link", "add", "br0", "type", "bridge"])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace with a bridge here: {_said(e)}"
    finally:
        probe.teardown()
    return None


@contextmanager
def netbed(n_hosts: int = 3, rate: str = "20mbit") -> Iterator[NetBed]:
    """`n_hosts` hosts at SUBNET.1, .2, ..., each linked to one switch at `rate` (a tc rate: "20mbit") each way."""
    prefix = _prefix()
    bed = NetBed(hub=f"{prefix}hub", rate=rate)
    _left_behind.append(bed)
    try:
        _ip(["netns", "add", bed.hub])
        _ip(["-n", bed.hub, "link", "set", "lo", "up"])
        _ip(["-n", bed.hub, "link", "add", "br0", "type", "bridge"])
        _ip(["-n", bed.hub, "link", "set", "br0", "up"])
        for i in range(1, n_hosts + 1):
            host = Host(namespace=f"{prefix}h{i}", address=f"{SUBNET}.{i}")
            bed.hosts.append(host)
            _ip(["netns", "add", host.namespace])
            port = f"port{i}"
            _ip(["-n", bed.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.namespace])
            _ip(["-n", bed.hub, "link", "set", port, "master", "br0", "up"])
            _ip(["-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _ip(["-n", host.namespace, "link", "set", "eth0", "up"])
            _ip(["-n", host.namespace, "link", "set", "lo", "up"])
            # the host's uplink (its eth0 sends) and downlink (the switch's port towards it sends)
            _limit(host.namespace, "eth0", rate)
            _limit(bed.hub, port, rate)
        yield bed
    finally:
        bed.teardown()


def _limit(namespace: str, device: str, rate: str) -> None:
    # a token bucket: `rate` on average, bursts of 32 KB (13 ms at 20 mbit), packets queued up to 100 ms
    _run(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", rate, "burst", "32kb",
          "latency", "100ms"])


def _prefix() -> str:
    """Unique per bed: this process and a counter (namespace names are machine-wide)."""
    return f"clm{os.getpid()}n{next(_numbers)}"


def _ip(args: list[str], check: bool = True) -> str:
    return _run(["ip", *args], check)


def _run(argv: list[str], check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=COMMAND_S).stdout


def _said(error: Exception) -> str:
    return (getattr(error, "stderr", "") or str(error)).strip()


@atexit.register
def _tear_down_left_behind() -> None:
    for bed in list(_left_behind):
        bed.teardown()
