"""A volunteer of a decentralized run: DiLoCo over torchft, so that machines on home links can train one model.

    commonlm swarm lighthouse --bind 0.0.0.0:29510 --min-replicas 2      # once, somewhere every volunteer reaches
    commonlm train --config C --data MY_DATA --out RUN --swarm HOST:29510  # on each volunteer, its own data

Each volunteer runs the one training loop (train/trainer.py) on its own data with its own AdamW (the inner
optimizer). Every `train.swarm_sync_every` (H) inner steps, torchft's `local_sgd.DiLoCo` (hooked into the inner
optimizer's step) asks the lighthouse for a quorum, averages the pseudo-gradients (global weights at the last sync
minus local weights now) over the volunteers in it with one all-reduce, and applies them to the global weights
with the outer optimizer (SGD, Nesterov momentum): every volunteer in the quorum then holds the same global
weights and trains on from them. Only those pseudo-gradients leave a machine, once per H steps, not every step's
gradients; no data does. A volunteer that joins late, or restarts, is behind the others' sync count: at its first
sync it fetches the model, AdamW state, global weights and outer momentum from a peer (torchft's healing), and
syncs with them from then on. One that leaves (stops, crashes, loses its link) is left out of the next quorum
once its heartbeats stop; a sync whose all-reduce failed is not applied by anyone (each goes back to the global
weights of the last sync and trains on).

A first defence against a bad volunteer (train.swarm_max_norm_ratio = k > 0): at each sync every volunteer first
shares the norm of its whole pseudo-gradient (one tiny all-reduce of one number per volunteer), and one whose
norm is over k times the median of them scales its update down to k times the median before the average. So
one diverged or misconfigured volunteer (a learning rate 1000x too high, a corrupt shard, an overflow) moves the
global weights by at most about k times an ordinary update, divided by the number of volunteers, instead of
wrecking them. It is clipping, not exclusion: the direction is kept, and an honest volunteer with a larger
update than the others (more or harder data) still counts. What it does not stop: a volunteer running modified
code (the clip is applied by the sender, so one that lies about its norm or skips the clip is not caught: that
needs every update seen by every volunteer, an all-gather of n times the bytes); a coordinated group of half the
volunteers or more (they set the median); updates that are wrong but not large (a poisoned direction, a
backdoor); poisoned data. Trust whom you let into the swarm (the lighthouse admits anyone who reaches it).

What is sent (train.swarm_compress): the fp32 pseudo-gradients, or bf16, int8 or their largest entries (top-k),
each with error feedback (scale/compress.py, which also counts the bytes each collective carries). Streaming
DiLoCo (train.swarm_fragments = N > 1): the model in N fragments of whole blocks, torchft's DiLoCo syncing one of
them every H / N steps in turn, so each sync sends 1/N of the model and a fragment is global only right after its
own sync (the others have trained on locally since theirs). So when the loop has run to train.max_steps, every
fragment that trained since its own sync (with N = 1 and max_steps not a multiple of H: the model) is synced once
more before the final model is written (`_end_sync`), and every volunteer's final model is the same global one.

The glue here: a TCPStore for torchft's process group, the Manager (its healing state: model and inner
optimizer), DiLoCo, and a record in metrics.jsonl per sync with the bytes sent. Every volunteer must start
from the same weights (the same config and train.seed, or the same --init): DiLoCo starts the global model
from each volunteer's own initial weights, and nothing checks them.

Network (see the report/docs): the lighthouse is central; the all-reduce (gloo) and healing (HTTP) go directly
between volunteers on ports chosen at random, and torchft's manager server binds every interface.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from commonlm.config import RunConfig
from commonlm.errors import UserError
from commonlm.scale.compress import (
    Bf16WithErrorFeedback,
    Calls,
    Deferred,
    Int8WithErrorFeedback,
    Plain,
    TopKWithErrorFeedback,
)
from commonlm.train.metrics import Metrics
from commonlm.utils import human
from commonlm.world import World


@contextmanager
def volunteer(config: RunConfig, world: World, model: nn.Module, optimizer: torch.optim.Optimizer,
              metrics: Metrics, step: int) -> Iterator[None]:
    """The training loop's body runs inside this: with train.swarm set, as a DiLoCo volunteer whose syncs happen
    in `optimizer.step()`, and once the loop ran to train.max_steps the end syncs (`_end_sync`) happen on the way
    out, before the trainer writes the final model; else nothing changes. `step` is the loop's step on entry."""
    cfg = config.train
    if not cfg.swarm:
        yield
        return
    if world.distributed:
        raise UserError("train.swarm: a volunteer is one process for now; start it with plain `commonlm train` "
                        "(no torchrun), one per machine")
    if cfg.lora_rank:
        raise UserError("train.swarm: LoRA runs cannot join a swarm yet (the frozen base would be sent at every "
                        "sync); set train.lora_rank=0")
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's manager logs every quorum and commit at info level
    Manager, ProcessGroupGloo, DiLoCo = _torchft()
    fragments = _fragments(model, cfg.swarm_fragments)

    lighthouse = _lighthouse_url(cfg.swarm)
    advertise = cfg.swarm_advertise or _address_towards(lighthouse)
    store = _tcp_store(advertise)
    timeout = timedelta(seconds=cfg.swarm_timeout)

    def state_dict() -> dict[str, Any]:  # what a late or restarted volunteer fetches from a peer
        return {"model": model.state_dict(), "inner_optimizer": optimizer.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["inner_optimizer"])

    pg = ProcessGroupGloo(timeout=timeout)
    try:
        manager = Manager(
            pg=pg, load_state_dict=load_state_dict, state_dict=state_dict,
            min_replica_size=cfg.swarm_min_replicas, use_async_quorum=False, timeout=timeout,
            quorum_timeout=timedelta(seconds=cfg.swarm_quorum_timeout), connect_timeout=timeout,
            rank=0, world_size=1, store_addr=advertise, store_port=store.port, lighthouse_addr=lighthouse,
            port=cfg.swarm_port, hostname=advertise,
            init_sync=False)  # (every volunteer starts from the same weights; see the module docstring)
    except Exception as e:  # torchft's RuntimeErrors: the lighthouse not there, a port taken
        raise UserError(f"train.swarm: cannot join the lighthouse at {cfg.swarm}: {e}. Is `commonlm swarm "
                        f"lighthouse` running there, and reachable from this machine?") from None
    counts = [len(list(fragment.parameters())) for fragment in fragments]  # (a tied weight once, as DiLoCo sends)
    clip = None
    if cfg.swarm_max_norm_ratio:
        clip = _NormClip(manager, Calls(manager, counts), cfg.swarm_max_norm_ratio)
    # (the method DiLoCo sends the pseudo-gradients by, one parameter at a time)
    sender = _sender(cfg.swarm_compress, cfg.swarm_topk, manager, pg, counts)
    manager.allreduce = sender
    if clip is not None:
        clip.send = sender  # (clipped, then compressed)
        manager.allreduce = clip
    momentum = cfg.swarm_outer_momentum
    outers = [torch.optim.SGD(fragment.parameters(), lr=cfg.swarm_outer_lr, momentum=momentum,
                              nesterov=momentum > 0) for fragment in fragments]  # (one each: see _fragments)
    try:
        with DiLoCo(manager, fragments, optimizer, outers, sync_every=cfg.swarm_sync_every,
                    pin_memory=False) as diloco:
            counter = _SyncLog(manager, cfg.swarm_sync_every, len(fragments), metrics, step, sender, clip)
            hook = optimizer.register_step_post_hook(counter)  # after DiLoCo's: sees the sync that just happened
            clock = optimizer.register_step_pre_hook(counter.before)
            try:
                yield
            except TimeoutError as e:
                raise UserError(f"train.swarm: no quorum within train.swarm_quorum_timeout="
                                f"{cfg.swarm_quorum_timeout:g}s ({e}): are enough volunteers up (the lighthouse's "
                                "--min-replicas)?") from None
            finally:
                hook.remove()
                clock.remove()
            if counter.step >= cfg.max_steps:  # (the loop ran to its last step, as every volunteer's does)
                # (torchft 0.2.0's fragments: DiLoCo has no public accessor for them)
                _end_sync(diloco._fragments, counter, cfg.swarm_quorum_timeout)
    finally:
        manager.shutdown(wait=False)


def _sender(compress: str, fraction: float, manager, pg, counts: list[int]):
    """What stands in for Manager.allreduce to send the pseudo-gradients (scale/compress.py)."""
    if compress == "bf16":
        return Bf16WithErrorFeedback(manager, manager.allreduce, Calls(manager, counts))
    if compress == "int8":
        return Int8WithErrorFeedback(manager, pg, Calls(manager, counts))
    if compress == "topk":
        return TopKWithErrorFeedback(manager, pg, Calls(manager, counts), fraction)
    return Plain(manager, manager.allreduce)


def _fragments(model: nn.Module, count: int) -> list[nn.Module]:
    """The model as Streaming DiLoCo's `count` fragments of whole blocks, in order (the embedding with the first, the
    final norm and head with the last), each synced at its own step; one: the model itself. A fragment holds the
    model's own parameters (a tied weight once), so DiLoCo's copies and outer steps act on the model; each has its
    own outer optimizer, because at a fragment's sync the other parameters still hold inner gradients."""
    if count == 1:
        return [model]
    named = list(model.named_parameters())
    blocks = 1 + max((int(name.split(".")[1]) for name, _ in named if name.startswith("blocks.")), default=-1)
    if count > blocks:
        raise UserError(f"train.swarm_fragments={count}: the model has {blocks} blocks; a fragment is whole blocks, "
                        f"so use at most {blocks}")
    fragments = [nn.ParameterDict() for _ in range(count)]
    after_blocks = False
    for name, parameter in named:
        if name.startswith("blocks."):
            index, after_blocks = int(name.split(".")[1]) * count // blocks, True
        else:
            index = count - 1 if after_blocks else 0
        fragments[index][name.replace(".", "/")] = parameter
    return fragments


def _end_sync(fragments: list, log: _SyncLog, quorum_timeout: float) -> None:
    """After the loop's last step, so that the final model is the global one on every volunteer: one more outer step
    (quorum, compressed all-reduce of the pseudo-gradients, outer SGD) for each fragment that trained on since its
    own sync, in DiLoCo's order (the manager's step modulo their number). That is all of them, unless the last step
    was a sync: then all but the fragment it synced. Every volunteer that ran the same max_steps reaches the same
    count here. An outer step rather than going back to each fragment's last global weights: those inner steps
    were trained, and a sync sends only what it would have sent at its own turn, early.

    If a sync fails (not applied, or no quorum within train.swarm_quorum_timeout), every fragment goes back to its
    global weights of its own last applied sync: the same on every volunteer, without the steps since."""
    unsynced = 0 if not log.inner_steps else len(fragments) - (log.inner_steps % log.period == 0)
    for _ in range(unsynced):
        log.before()
        try:
            log.manager.start_quorum()
        except (TimeoutError, RuntimeError) as e:  # (the others gone, the lighthouse gone)
            committed, failure = False, f"found no quorum within train.swarm_quorum_timeout={quorum_timeout:g}s ({e})"
        else:
            fragment = fragments[log.manager.current_step() % len(fragments)]  # (after any healing, as DiLoCo)
            fragment.prepare_sync()
            committed, failure = fragment.perform_sync(), "was not applied"
            log.synced(end=True)
        if not committed:
            for fragment in fragments:
                fragment.restore_parameters()
            log.metrics.log({"step": log.step, "swarm_end": True, "swarm_end_failed": failure},
                            f"[yellow]step {log.step}: an end sync {failure}: every fragment is back at its global "
                            "weights of its own last applied sync (the inner steps since are dropped)[/]")
            return


def _torchft():
    try:
        from torchft import Manager, ProcessGroupGloo
        from torchft.local_sgd import DiLoCo
    except ImportError as e:
        raise UserError(f"train.swarm needs torchft ({e}): pip install torchft==0.2.0") from None
    return Manager, ProcessGroupGloo, DiLoCo


class _SyncLog:
    """An inner-optimizer step hook: after each outer sync, one metrics record of what it did and sent (the end
    syncs call `synced` themselves)."""

    def __init__(self, manager, sync_every: int, fragments: int, metrics: Metrics, step: int, sender,
                 clip: _NormClip | None) -> None:
        self.manager, self.metrics, self.step, self.sender, self.clip = manager, metrics, step, sender, clip
        self.fragments = fragments
        self.period = sync_every // fragments  # (Streaming DiLoCo syncs one fragment every H / fragments steps)
        self.started = time.perf_counter()
        self.inner_steps = 0
        self.commits = manager.current_step()
        self.sent_total = 0

    def before(self, *hook_args) -> None:
        self.started = time.perf_counter()

    def __call__(self, optimizer, args, kwargs) -> None:
        self.inner_steps += 1
        self.step += 1
        if self.inner_steps % self.period == 0:
            self.synced()

    def synced(self, end: bool = False) -> None:
        """Log the sync that just happened (`end`: one of the end syncs, after the last step)."""
        commits = self.manager.current_step()
        committed = commits > self.commits
        fragment = (commits - committed) % self.fragments  # (the step it was synced at, as DiLoCo chose)
        self.commits = commits
        if self.sender.remainders is not None:
            self.sender.remainders.settle(committed)  # (error feedback: a failed sync's remainder is not owed)
        volunteers = self.manager.num_participants()
        payload, sent = self.sender.traffic.take()  # what went into this sync's collectives, and out of this machine
        self.sent_total += sent
        # the seconds of the optimizer step that synced: its inner step, the quorum, the all-reduce, the outer step
        # (an end sync: no inner step)
        seconds = time.perf_counter() - self.started
        record = {"step": self.step, "swarm_sync": commits, "swarm_committed": committed,
                  "swarm_volunteers": volunteers, "swarm_payload_bytes": payload, "swarm_sent_bytes": sent,
                  "swarm_sent_total": self.sent_total, "swarm_sync_s": round(seconds, 4)}
        if self.fragments > 1:
            record["swarm_fragment"] = fragment
        if end:
            record["swarm_end"] = True
        clipped = ""
        if self.clip is not None and self.clip.norms is not None:
            record |= {"swarm_update_norm": self.clip.norm, "swarm_norms": self.clip.norms,
                       "swarm_update_scale": self.clip.scale}
            if self.clip.scale < 1:
                clipped = (f" · this update's norm {self.clip.norm:.3g} clipped to {self.clip.scale:.3g}x "
                           f"(median {self.clip.median:.3g})")
        outcome = "applied" if committed else "NOT applied (failed)"
        part = f" (fragment {fragment} of {self.fragments})" if self.fragments > 1 else ""
        what = "end sync" if end else "outer sync"
        self.metrics.log(record, f"step {self.step}: {what} {commits}{part} {outcome} with {volunteers} "
                         f"volunteer(s) in {seconds:.2f}s · sent {human(sent)}B{clipped}")


class _NormClip:
    """Manager.allreduce that holds a sync's pseudo-gradients back until it has all of them (`calls`), shares their
    norm with the other volunteers, scales them down to `max_ratio` times the median norm if they are above it,
    and only then sends them (to `send`: the manager's all-reduce, or the compressed one wrapping it)."""

    def __init__(self, manager, calls: Calls, max_ratio: float) -> None:
        self.manager, self.calls, self.max_ratio = manager, calls, max_ratio
        self.exchange = manager.allreduce  # (the plain one: the norms go uncompressed)
        self.send = manager.allreduce
        self.pending: list[tuple[torch.Tensor, bool, dict, Deferred]] = []
        self.norms: list[float] | None = None  # the last sync's, for the log
        self.norm, self.median, self.scale = 0.0, 0.0, 1.0

    def __call__(self, tensor: torch.Tensor, should_quantize: bool = False, **kwargs) -> dist.Work:
        work = Deferred()
        self.pending.append((tensor, should_quantize, kwargs, work))
        if self.calls.next()[2]:  # the fragment's last pseudo-gradient
            self._release()
        return work

    def _release(self) -> None:
        pending, self.pending = self.pending, []
        self.norm = float(torch.sqrt(sum(t.detach().float().pow(2).sum() for t, *_ in pending)))
        self.norms = self._everyones(self.norm)
        self.median = float(torch.tensor(self.norms).median())  # (the lower of the two middle ones)
        limit = self.max_ratio * self.median
        self.scale = limit / self.norm if 0 < limit < self.norm else 1.0
        for tensor, should_quantize, kwargs, work in pending:
            if self.scale < 1:
                tensor.mul_(self.scale)
            work.work = self.send(tensor, should_quantize, **kwargs)

    def _everyones(self, norm: float) -> list[float]:
        """Every participating volunteer's norm, in rank order: one slot each, a sum over the quorum."""
        from torch.distributed import ReduceOp

        volunteers, rank = self.manager.num_participants(), self.manager.participating_rank()
        if volunteers <= 1:
            return [norm]
        norms = torch.zeros(volunteers)
        if rank is not None:  # (one healing this sync sends zeros and is not counted)
            norms[rank] = norm
        self.exchange(norms, reduce_op=ReduceOp.SUM).wait()
        return norms.tolist()


def _lighthouse_url(address: str) -> str:
    return address if address.startswith("http://") else f"http://{address}"  # (HOST:PORT: config.py checked it)


def _address_towards(url: str) -> str:
    """This machine's address on the interface that routes to `url`'s host: where other volunteers (who reach
    the same lighthouse) are likeliest to reach this one. (A UDP `connect` only picks the route; nothing is sent.)"""
    host, _, port = url.removeprefix("http://").rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, int(port))[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port)))
            return probe.getsockname()[0]
    except OSError as e:
        raise UserError(f"train.swarm: no route to the lighthouse host {host} ({e}); check the address, or set "
                        "train.swarm_advertise to this machine's address") from None


def _tcp_store(host: str):
    """The key-value store torchft's process group meets in (this volunteer's; the quorum uses one of them)."""
    from torch.distributed import TCPStore

    try:
        return TCPStore(host_name=host, port=0, is_master=True, wait_for_workers=False)
    except Exception as e:
        raise UserError(f"train.swarm: cannot open a store on {host} ({e}); set train.swarm_advertise to an "
                        "address of this machine") from None
