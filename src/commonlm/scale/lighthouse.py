"""`commonlm swarm lighthouse`: the one central coordinator of a swarm, torchft's LighthouseServer.

Volunteers (`commonlm train --swarm HOST:PORT`) heartbeat to it and ask it, at every outer sync, who is there:
it answers with a quorum (the volunteers that sync together this time, and who must heal from whom). No weights
or gradients pass through it; they go directly between volunteers. It waits for `min_replicas` volunteers; once
that many are there it still waits up to `join_timeout_ms` for volunteers that heartbeat but have not asked yet
(so that a fast one does not keep syncing alone), unless every member of the previous quorum is back.
"""

from __future__ import annotations

import signal
import threading

from commonlm.errors import UserError
from commonlm.utils import console


def run_lighthouse(bind: str, min_replicas: int, join_timeout_ms: int, heartbeat_timeout_ms: int) -> None:
    """Serve on `bind` (HOST:PORT) until SIGINT or SIGTERM."""
    try:
        from torchft.coordination import LighthouseServer
    except ImportError as e:
        raise UserError(f"swarm lighthouse needs torchft ({e}): pip install torchft==0.2.0") from None
    if min_replicas < 1:
        raise UserError(f"swarm lighthouse: --min-replicas {min_replicas} must be at least 1")
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"swarm lighthouse: --bind {bind!r} must be HOST:PORT, e.g. 0.0.0.0:29510 or 10.0.0.1:29510")
    try:
        server = LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                                  heartbeat_timeout_ms=heartbeat_timeout_ms)
    except Exception as e:  # torchft raises a bare RuntimeError for a port in use or an address not here
        raise UserError(f"swarm lighthouse: cannot listen on {bind}: {e}; choose another --bind") from None
    stopped = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopped.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(f"lighthouse listening on {server.address()} (bound to {bind}) · quorum of at least "
                      f"{min_replicas} · waits {join_timeout_ms / 1000:g}s for late volunteers · Ctrl-C stops it\n"
                      f"volunteers: commonlm train ... --swarm {_reachable(bind, server.address())}", soft_wrap=True)
        stopped.wait()
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print("lighthouse stopped")


def _reachable(bind: str, address: str) -> str:
    """HOST:PORT for volunteers: the bound host (or, bound to every interface, the host torchft reports) and the
    port listened on (the one torchft picked for port 0)."""
    host = bind.rpartition(":")[0]
    reported_host, _, port = address.removeprefix("http://").rpartition(":")
    return f"{reported_host if host in ('0.0.0.0', '[::]', '::') else host}:{port}"
