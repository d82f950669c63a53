"""What a swarm volunteer sends its pseudo-gradients as (train.swarm_compress), and how many bytes that is.

DiLoCo (scale/swarm.py) sends a sync's pseudo-gradients through `Manager.allreduce`, one call per parameter, in the
same order at every sync. Each class here stands in for that method:

- `Plain` (none): the manager's fp32 ring all-reduce, counted.
- `Bf16WithErrorFeedback` (bf16): the same all-reduce of a bf16 copy, half the bytes.
- `Int8WithErrorFeedback` (int8): a quantized reduction, not an int8 sum (every volunteer's scales differ, and int8
  sums overflow). The pseudo-gradients of a sync, flattened into one vector, are cut into blocks of `BLOCK` values,
  each sent as int8 with one fp32 scale (its largest magnitude / 127), so a value is off by at most half a step,
  absmax / 254. An all-to-all gives volunteer r the r-th slice of everyone's blocks; r dequantizes them, sums them
  in fp32, divides by the number of volunteers, quantizes that average again, and an all-gather gives every slice
  to everyone, who all dequantize the same bytes: the same average everywhere. Each volunteer sends 2(n-1)/n of
  its int8 payload (plus 4 bytes of scale per block): a quarter of the fp32 ring all-reduce's bytes. This is the
  design of torchft's own `should_quantize` (fp8, `torchft.collectives.allreduce_quantized`), which needs triton
  kernels on a CUDA device; without triton its Manager silently all-reduces in fp32, so it is done here in torch.
- `TopKWithErrorFeedback` (topk): of each pseudo-gradient only its ceil(fraction x size) entries largest in
  magnitude, as int32 positions with bf16 values (6 bytes an entry). Everyone's are all-gathered, summed into a
  dense tensor and divided by the number of volunteers. An all-gather is not a reduction: each volunteer sends
  (n-1) times its entries, so the bytes grow with the number of volunteers, unlike an all-reduce's.

Error feedback: what a volunteer did not send of a pseudo-gradient (bf16 or int8 rounding, the entries top-k left
out) is kept and added to the same parameter's pseudo-gradient at its next sync, so it is late, not lost. With
int8 the average's own rounding is kept too, by the volunteer whose slice it is, n times over (divided by n at
the next sync, it is that rounding). A remainder is adopted only once the sync it came from was applied (`settle`):
after a failed sync the global weights did not move, the next pseudo-gradient holds the failed one again, and the
remainder carried into the failed sync is the one still owed.

With Streaming DiLoCo (train.swarm_fragments) a sync sends one fragment of the model, the manager's step modulo
their number (`Calls`); remainders and counts are per fragment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

BLOCK = 256  # values per int8 scale: 4 bytes of scale per 256 of int8, 1.6% more bytes


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` (a length that is a multiple of BLOCK) as int8 blocks [blocks, BLOCK] and their fp32 scales
    [blocks]: each block's largest magnitude / 127, so every value is within scale / 2 of int8 x scale."""
    blocks = values.float().view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1) / 127
    steps = torch.round(blocks / torch.where(scales > 0, scales, 1.0)[:, None])
    return steps.clamp_(-127, 127).to(torch.int8), scales


def dequantize_int8(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The flat fp32 values that `quantize_int8` stands for."""
    return (quantized.float() * scales[:, None]).flatten()


def top_k(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The positions of the ceil(fraction x size) entries of `values` largest in magnitude (at least one)."""
    k = max(1, math.ceil(fraction * values.numel()))
    return torch.topk(values.detach().abs().flatten(), min(k, values.numel()), sorted=False).indices


class Calls:
    """Which pseudo-gradient a call of `Manager.allreduce` carries: (fragment, position, whether it is the
    fragment's last). DiLoCo sends the `counts[f]` parameters of fragment f in the same order at every sync of it,
    and the fragment synced is the manager's step (the count of applied syncs, after the quorum and any healing)
    modulo the number of fragments, as in torchft's DiLoCo."""

    def __init__(self, manager, counts: list[int]) -> None:
        self.manager, self.counts = manager, counts
        self.fragment, self.position = 0, 0

    def next(self) -> tuple[int, int, bool]:
        if self.position == 0:
            self.fragment = self.manager.current_step() % len(self.counts)
        position = self.position
        self.position = (position + 1) % self.counts[self.fragment]
        return self.fragment, position, self.position == 0


class Traffic:
    """Bytes a volunteer put into its collectives (its payload) and sent, since the last `take`."""

    def __init__(self) -> None:
        self.payload, self.sent = 0, 0.0

    def add(self, payload: int, sent: float) -> None:
        self.payload += payload
        self.sent += sent

    def take(self) -> tuple[int, int]:
        taken = (self.payload, round(self.sent))
        self.payload, self.sent = 0, 0.0
        return taken


def ring_allreduce_bytes(nbytes: int, volunteers: int) -> float:
    """What one of n volunteers sends in a ring all-reduce (gloo's) of a tensor of `nbytes`."""
    return 2 * (volunteers - 1) / volunteers * nbytes if volunteers > 1 else 0.0


class Remainders:
    """Error feedback: per key (a parameter, or a fragment's flat vector), what was not sent yet."""

    def __init__(self) -> None:
        self.kept: dict[object, torch.Tensor] = {}
        self.proposed: dict[object, torch.Tensor] = {}

    def corrected(self, key: object, pseudo_gradient: torch.Tensor) -> torch.Tensor:
        """The pseudo-gradient plus what is still owed of this key (a new tensor)."""
        kept = self.kept.get(key)
        return pseudo_gradient.float() + kept if kept is not None else pseudo_gradient.float().clone()

    def propose(self, key: object, remainder: torch.Tensor) -> None:
        self.proposed[key] = remainder

    def settle(self, applied: bool) -> None:
        """After a sync: its remainders replace the kept ones if it was applied, else they are dropped."""
        if applied:
            self.kept.update(self.proposed)
        self.proposed = {}


class Plain:
    """Manager.allreduce as it is (fp32), with its bytes counted."""

    def __init__(self, manager, allreduce: Callable[..., dist.Work]) -> None:
        self.manager, self.allreduce = manager, allreduce
        self.traffic, self.remainders = Traffic(), None

    def __call__(self, tensor: torch.Tensor, should_quantize: bool = False, **kwargs) -> dist.Work:
        self.traffic.add(tensor.nbytes, ring_allreduce_bytes(tensor.nbytes, self.manager.num_participants()))
        return self.allreduce(tensor, should_quantize, **kwargs)


class Bf16WithErrorFeedback:
    """Manager.allreduce of a bf16 copy (half the bytes), its result landing in DiLoCo's fp32 tensor; what rounding
    to bf16 lost is added to the same parameter's next pseudo-gradient."""

    def __init__(self, manager, allreduce: Callable[..., dist.Work], calls: Calls) -> None:
        self.manager, self.allreduce, self.calls = manager, allreduce, calls
        self.traffic, self.remainders = Traffic(), Remainders()

    def __call__(self, tensor: torch.Tensor, should_quantize: bool = False, **kwargs) -> dist.Work:
        fragment, position, _ = self.calls.next()
        corrected = self.remainders.corrected((fragment, position), tensor)
        sent = corrected.to(torch.bfloat16)
        self.remainders.propose((fragment, position), corrected - sent.float())
        self.traffic.add(sent.nbytes, ring_allreduce_bytes(sent.nbytes, self.manager.num_participants()))
        return Restored(self.allreduce(sent, should_quantize, **kwargs), sent, tensor)


class Restored(dist.Work):
    """The all-reduce of a low-precision copy, whose result lands in the fp32 tensor DiLoCo reads once it waited."""

    def __init__(self, work: dist.Work, sent: torch.Tensor, target: torch.Tensor) -> None:
        super().__init__()
        self.work, self.sent, self.target = work, sent, target

    def wait(self, timeout=None) -> bool:
        self.work.wait()  # (torchft's work divides by the number of volunteers here)
        self.target.copy_(self.sent)
        return True

    def get_future(self) -> torch.futures.Future:
        return self.work.get_future().then(lambda _: self.target.copy_(self.sent))


class Deferred(dist.Work):
    """The work of a collective started later, when the sync's last pseudo-gradient arrives (DiLoCo starts every
    one before it waits on any)."""

    def __init__(self) -> None:
        super().__init__()
        self.work: dist.Work | None = None

    def wait(self, timeout=None) -> bool:
        self.work.wait()
        return True

    def get_future(self) -> torch.futures.Future:
        return self.work.get_future()


class _WholeSync:
    """Manager.allreduce replaced by collectives over a whole sync (one fragment's pseudo-gradients, flattened into
    one vector): each call's tensor is held until the fragment's last arrives, then `reduce` averages them all in
    place over the quorum's volunteers, on torchft's process group `pg`. Failures go to the manager as its own
    all-reduce's do (`report_error`): the sync is then applied by nobody."""

    def __init__(self, manager, pg, calls: Calls) -> None:
        self.manager, self.pg, self.calls = manager, pg, calls
        self.traffic, self.remainders = Traffic(), Remainders()
        self.pending: list[tuple[torch.Tensor, Deferred]] = []

    def __call__(self, tensor: torch.Tensor, should_quantize: bool = False, **kwargs) -> dist.Work:
        fragment, _, last = self.calls.next()
        work = Deferred()
        self.pending.append((tensor, work))
        if last:
            self._release(fragment)
        return work

    def _release(self, fragment: int) -> None:
        from torchft.work import _DummyWork

        pending, self.pending = self.pending, []
        tensors = [tensor for tensor, _ in pending]
        if not self.manager.errored():  # (after a failure every call is a no-op, as in Manager.allreduce)
            try:
                self.manager.wait_quorum()
                if not self.manager.is_participating():  # (a volunteer healing meanwhile contributes nothing)
                    for tensor in tensors:
                        tensor.zero_()
                flat = torch.cat([tensor.detach().reshape(-1).float() for tensor in tensors])
                average = self.reduce(fragment, flat, tensors, self.manager.num_participants(),
                                      self.manager.participating_rank() or 0)
                for tensor, part in zip(tensors, average.split([t.numel() for t in tensors]), strict=True):
                    tensor.copy_(part.view_as(tensor))
            except Exception as e:  # a peer gone, a timeout: as torchft's manager handles its own all-reduce's
                self.manager.report_error(e)
        for tensor, work in pending:
            work.work = _DummyWork(tensor)

    def reduce(self, fragment: int, flat: torch.Tensor, tensors: list[torch.Tensor], volunteers: int,
               rank: int) -> torch.Tensor:
        raise NotImplementedError

    def _all_to_all(self, rows: torch.Tensor) -> torch.Tensor:
        from torch.distributed.distributed_c10d import AllToAllOptions

        received = torch.empty_like(rows)
        self.pg.alltoall_base(received, rows, [], [], AllToAllOptions()).wait()
        return received

    def _all_gather(self, mine: torch.Tensor, volunteers: int) -> list[torch.Tensor]:
        from torch.distributed.distributed_c10d import AllgatherOptions

        everyones = [torch.empty_like(mine) for _ in range(volunteers)]
        self.pg.allgather([everyones], [mine], AllgatherOptions()).wait()
        return everyones


def _as_bytes(*parts: torch.Tensor) -> torch.Tensor:
    """Rows of tensors side by side as one uint8 tensor [rows, bytes] (one collective, not one per tensor)."""
    return torch.cat([part.contiguous().view(torch.uint8) for part in parts], dim=-1)


class Int8WithErrorFeedback(_WholeSync):
    """Int8 blocks with fp32 scales: a quantized reduce-scatter (all-to-all), a local fp32 sum, an all-gather."""

    def reduce(self, fragment: int, flat: torch.Tensor, tensors: list[torch.Tensor], volunteers: int,
               rank: int) -> torch.Tensor:
        length = flat.numel()
        corrected = F.pad(self.remainders.corrected(fragment, flat), (0, -length % (volunteers * BLOCK)))
        quantized, scales = quantize_int8(corrected)
        remainder = corrected - dequantize_int8(quantized, scales)
        # volunteer r gets the r-th slice of everyone's blocks and their scales, in rank order
        rows = _as_bytes(quantized.view(volunteers, -1), scales.view(volunteers, -1))
        received = self._all_to_all(rows)
        slice_values = quantized.numel() // volunteers
        mine = sum(dequantize_int8(*self._unpack(row, slice_values)) for row in received) / volunteers
        mine_quantized, mine_scales = quantize_int8(mine)
        # this slice's second rounding is everyone's: its owner carries it, n times (averaged over n next time)
        remainder.view(volunteers, -1)[rank] += volunteers * (mine - dequantize_int8(mine_quantized, mine_scales))
        everyones = self._all_gather(_as_bytes(mine_quantized.flatten(), mine_scales), volunteers)
        average = torch.cat([dequantize_int8(*self._unpack(row, slice_values)) for row in everyones])
        self.remainders.propose(fragment, remainder[:length])
        payload = rows.numel()
        self.traffic.add(payload, 2 * (volunteers - 1) / volunteers * payload)  # all-to-all, then ring all-gather
        return average[:length]

    @staticmethod
    def _unpack(row: torch.Tensor, values: int) -> tuple[torch.Tensor, torch.Tensor]:
        return row[:values].view(torch.int8).view(-1, BLOCK), row[values:].view(torch.float32)


class TopKWithErrorFeedback(_WholeSync):
    """Each pseudo-gradient's largest entries (int32 positions, bf16 values), all-gathered and summed densely."""

    def __init__(self, manager, pg, calls: Calls, fraction: float) -> None:
        super().__init__(manager, pg, calls)
        self.fraction = fraction

    def reduce(self, fragment: int, flat: torch.Tensor, tensors: list[torch.Tensor], volunteers: int,
               rank: int) -> torch.Tensor:
        corrected = self.remainders.corrected(fragment, flat)
        positions, offset = [], 0
        for part in corrected.split([t.numel() for t in tensors]):
            positions.append(top_k(part, self.fraction) + offset)
            offset += part.numel()
        index_dtype = torch.int32 if flat.numel() < 2 ** 31 else torch.int64
        chosen = torch.cat(positions)
        values = corrected[chosen].to(torch.bfloat16)
        remainder = corrected.clone()
        remainder[chosen] -= values.float()
        mine = _as_bytes(chosen.to(index_dtype), values)  # (positions first: each part stays aligned)
        average = torch.zeros_like(flat)
        split = chosen.numel() * index_dtype.itemsize
        for row in self._all_gather(mine, volunteers):  # (every volunteer sends as many: the same model)
            average.index_add_(0, row[:split].view(index_dtype).long(), row[split:].view(torch.bfloat16).float())
        self.remainders.propose(fragment, remainder)
        self.traffic.add(mine.numel(), (volunteers - 1) * mine.numel())  # a ring all-gather
        return average / volunteers
