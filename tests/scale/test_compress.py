"""Pseudo-gradient compression (scale/compress.py): the pure functions, then the compressors run by two volunteers
as two threads of this process over real gloo (on the loopback device, in-process store), with the few methods of
torchft's Manager they use standing for it."""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from commonlm.scale.compress import (
    BLOCK,
    Calls,
    Int8WithErrorFeedback,
    TopKWithErrorFeedback,
    dequantize_int8,
    quantize_int8,
    top_k,
)


def test_int8_round_trip_is_within_half_a_step_of_each_block():
    generator = torch.Generator().manual_seed(0)
    # blocks of very different magnitudes, one all zero, one with a single large value
    values = torch.randn(8 * BLOCK, generator=generator) * torch.logspace(-6, 2, 8).repeat_interleave(BLOCK)
    values[2 * BLOCK:3 * BLOCK] = 0
    values[5 * BLOCK + 7] = 1e4
    quantized, scales = quantize_int8(values)
    assert quantized.dtype == torch.int8 and quantized.shape == (8, BLOCK) and scales.dtype == torch.float32
    back = dequantize_int8(quantized, scales)
    absmax = values.view(8, BLOCK).abs().amax(dim=1)
    error = (back - values).abs().view(8, BLOCK).amax(dim=1)
    assert (error <= absmax / 254 * (1 + 1e-5)).all()
    assert (back[2 * BLOCK:3 * BLOCK] == 0).all() and (quantized.abs() <= 127).all()
    assert (error > 0).any()  # (it did round)


def test_top_k_keeps_exactly_the_largest_magnitudes():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    chosen = top_k(values, 0.01)
    assert chosen.numel() == 10
    assert set(chosen.tolist()) == set(values.abs().argsort(descending=True)[:10].tolist())
    assert top_k(values, 1e-9).numel() == 1 and top_k(values, 1.0).numel() == 1000
    assert top_k(torch.randn(7, 3), 0.1).numel() == 3  # ceil(2.1)


class Quorum:
    """torchft's Manager as a compressor sees it: a quorum of `volunteers`, this one at `rank`, all participating."""

    def __init__(self, rank: int, volunteers: int) -> None:
        self.rank, self.volunteers, self.step, self.error = rank, volunteers, 0, None

    def current_step(self) -> int:
        return self.step

    def num_participants(self) -> int:
        return self.volunteers

    def participating_rank(self) -> int:
        return self.rank

    def is_participating(self) -> bool:
        return True

    def wait_quorum(self) -> None:
        pass

    def errored(self):
        return self.error

    def report_error(self, e: Exception) -> None:
        self.error = e


def _gloo(store, rank: int, volunteers: int):
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(interface="lo")]
    options._timeout = timedelta(seconds=30)
    return dist.ProcessGroupGloo(dist.PrefixStore("compress", store), rank, volunteers, options)


def _volunteers(make, inputs: list[list[list[torch.Tensor]]], applied: list[bool]):
    """Each of len(inputs) volunteers, a thread, sends its inputs[v][sync] (one tensor per parameter) at each sync
    through `make(manager, pg, calls)`; returns what each received per sync and the compressors."""
    store, received, compressors = dist.HashStore(), [None] * len(inputs), [None] * len(inputs)

    def volunteer(rank: int) -> None:
        manager = Quorum(rank, len(inputs))
        compressor = make(manager, _gloo(store, rank, len(inputs)), Calls(manager, [len(inputs[rank][0])]))
        compressors[rank], received[rank] = compressor, []
        for sync, tensors in enumerate(inputs[rank]):
            sent = [t.clone() for t in tensors]
            for work in [compressor(t) for t in sent]:  # (as DiLoCo: every call, then every wait)
                work.wait()
            received[rank].append(sent)
            compressor.remainders.settle(applied[sync])
            manager.step += applied[sync]

    threads = [threading.Thread(target=volunteer, args=(rank,)) for rank in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None and len(r) == len(inputs[0]) for r in received), "a volunteer failed"
    return received, compressors


def _pseudo_gradients(seed: int, syncs: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(300,), (40, 33), (5,)]  # (not multiples of the block: padding)
    return [[torch.randn(shape, generator=generator) * (0.01 + 0.1 * i) for i, shape in enumerate(shapes)]
            for _ in range(syncs)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("method", ["int8", "topk"])
@pytest.mark.parametrize("n", [2, 3])
def test_volunteers_get_the_same_average_and_error_feedback_carries_the_remainder(method, n):
    syncs = 6
    inputs = [_pseudo_gradients(seed, syncs) for seed in range(10, 10 + n)]
    if method == "int8":
        def make(manager, pg, calls):
            return Int8WithErrorFeedback(manager, pg, calls)
    else:
        def make(manager, pg, calls):
            return TopKWithErrorFeedback(manager, pg, calls, fraction=0.05)
    received, compressors = _volunteers(make, inputs, [True] * syncs)

    for sync in range(syncs):
        assert all(torch.equal(_flat(received[0][sync]), _flat(received[v][sync])) for v in range(n)), sync
    first = _flat(received[0][0])  # (all volunteers apply the same average)
    truth = sum(_flat(inputs[v][0]) for v in range(n)) / n
    if method == "int8":  # each input rounded once (half a step of its block), the average once more
        scale = max(_flat(inputs[v][0]).abs().max() for v in range(n)) / 127
        assert (first - truth).abs().max() <= scale * 1.001
    else:  # only 5% of each parameter's entries, at most, from each volunteer
        sizes = [t.numel() for t in inputs[0][0]]
        assert (first != 0).sum() <= n * sum(-(-size * 5 // 100) for size in sizes)
    # nothing is lost, only late: everything applied, plus what each volunteer still owes, is everything sent
    applied = sum(_flat(received[0][sync]) for sync in range(syncs))
    owed = sum(c.remainders.kept[0] for c in compressors) / n
    everything = sum(_flat(inputs[v][sync]) for v in range(n) for sync in range(syncs)) / n
    assert torch.allclose(applied + owed, everything, atol=1e-5)
    assert owed.abs().max() > 0


def test_bytes_per_sync_are_what_the_collectives_carry():
    inputs = [_pseudo_gradients(seed, 1) for seed in (10, 11)]
    values = sum(t.numel() for t in inputs[0][0])  # 1625: padded to 2 x 4 blocks of 256 (2048 values)
    for make, payload, sent in [
        (lambda m, pg, calls: Int8WithErrorFeedback(m, pg, calls), 2048 + 4 * 8, 2048 + 4 * 8),  # 2(n-1)/n = 1
        (lambda m, pg, calls: TopKWithErrorFeedback(m, pg, calls, 0.01), 6 * (3 + 14 + 1), 6 * (3 + 14 + 1))]:
        _, compressors = _volunteers(make, inputs, [True])
        assert [c.traffic.take() for c in compressors] == [(payload, sent)] * 2
        assert values * 4 / payload > 3.1  # (against fp32)


def test_a_failed_sync_leaves_the_remainder_as_it_was_and_its_pseudo_gradient_comes_again():
    # sync 1 fails (not applied): DiLoCo keeps the global weights, so sync 2's pseudo-gradient holds sync 1's too
    g = [_pseudo_gradients(seed, 3) for seed in (20, 21)]
    inputs = [[g[v][0], [a + b for a, b in zip(g[v][1], g[v][2], strict=True)]] for v in range(2)]
    inputs = [[g[v][0], g[v][1], inputs[v][1]] for v in range(2)]
    received, compressors = _volunteers(lambda m, pg, calls: TopKWithErrorFeedback(m, pg, calls, 0.05), inputs,
                                        [True, False, True])
    applied = _flat(received[0][0]) + _flat(received[0][2])
    owed = sum(c.remainders.kept[0] for c in compressors) / 2
    everything = sum(_flat(g[v][sync]) for v in range(2) for sync in range(3)) / 2
    assert torch.allclose(applied + owed, everything, atol=1e-5)
