"""Continuous batching gives every request what it would get alone."""

import threading

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.infer.engine import Engine, Request, apply_penalties
from commonlm.infer.generate import generate_ids
from commonlm.model.decoder import Decoder
from tests.procs import LAST_RESORT_S

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Decoder(ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=128,
                            max_seq_len=64)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)  # sharper distributions: greedy paths differ between prompts
    return m


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_all(engine, requests):
    outputs = [[] for _ in requests]
    reasons = [None] * len(requests)
    seqs = []
    for i, r in enumerate(requests):
        seqs.append(engine.submit(r, on_token=outputs[i].append,
                                  on_finish=lambda reason, i=i: reasons.__setitem__(i, reason)))
    for s in seqs:
        assert s.wait(timeout=LAST_RESORT_S)
    return outputs, reasons


def test_greedy_batched_equals_alone(model):
    engine = Engine(model, max_batch=4, prefill_chunk=7).start()  # more requests than slots, chunked prefill
    try:
        ps = prompts(10)
        outputs, reasons = run_all(engine, [Request(p, max_tokens=12, temperature=0) for p in ps])
    finally:
        engine.stop()
    for p, out in zip(ps, outputs):
        assert out == generate_ids(model, p, max_tokens=12, temperature=0.0)
    assert reasons == ["length"] * 10
    assert len({tuple(o) for o in outputs}) > 5  # independent outputs, not one copied stream
    assert engine.stats.generated_tokens == 120 and max(engine.stats.batch_sizes) == 4


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    r = dict(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    alone = Engine(model, max_batch=1)
    out_alone, _ = run_all(alone.start(), [Request(prompts(1)[0], **r)])
    alone.stop()
    crowd = Engine(model, max_batch=8).start()
    outs, _ = run_all(crowd, [Request(p, **r) for p in prompts(6, seed=3)] + [Request(prompts(1)[0], **r)])
    crowd.stop()
    assert outs[-1] == out_alone[0]


def test_a_mixed_batch_gives_each_row_its_own_result(model):
    # greedy rows are picked together, the others one by one: each row must still get what it gets alone
    kinds = [dict(temperature=0), dict(temperature=0, repetition_penalty=1.5), dict(temperature=1.0, seed=11),
             dict(temperature=0), dict(temperature=0, presence_penalty=2.0), dict(temperature=0.8, top_k=5, seed=3)]
    ps = prompts(len(kinds), seed=5)
    requests = [Request(p, max_tokens=10, **k) for p, k in zip(ps, kinds)]
    alone = []
    for r in requests:
        engine = Engine(model, max_batch=1).start()
        alone.append(run_all(engine, [r])[0][0])
        engine.stop()
    engine = Engine(model, max_batch=len(kinds)).start()
    together, _ = run_all(engine, requests)
    engine.stop()
    assert together == alone
    assert max(engine.stats.batch_sizes) == len(kinds)
    for row in (1, 4):  # the penalties were applied, not skipped with the plain greedy rows (they change these)
        assert alone[row] != generate_ids(model, ps[row], max_tokens=10, temperature=0.0)


def test_stop_ids_max_len_and_errors(model):
    engine = Engine(model, max_batch=2, max_len=24).start()
    try:
        p = prompts(1)[0][:10]
        greedy = generate_ids(model, p, max_tokens=5, temperature=0.0)
        outs, reasons = run_all(engine, [Request(p, max_tokens=50, temperature=0, stop_ids=(greedy[3],))])
        assert outs[0] == greedy[: greedy.index(greedy[3])] and reasons == ["stop"]
        outs, reasons = run_all(engine, [Request(p, max_tokens=50, temperature=0)])
        assert len(p) + len(outs[0]) == 24 + 1 and reasons == ["length"]  # the last token is emitted, not cached
        with pytest.raises(ValueError, match="no room"):
            engine.submit(Request(list(range(24)), max_tokens=1))
    finally:
        engine.stop()


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=1).start()
    try:
        started, resume = threading.Event(), threading.Event()

        def hold(token):  # runs in the engine thread: pause it after the first token until we have cancelled
            started.set()
            resume.wait(10)

        first = engine.submit(Request(prompts(1)[0], max_tokens=10_000, temperature=0), on_token=hold)
        assert started.wait(LAST_RESORT_S)
        second = engine.submit(Request(prompts(1)[0], max_tokens=3, temperature=0))
        first.cancel()
        resume.set()
        assert first.wait(LAST_RESORT_S) and first.finish_reason == "cancelled"
        assert second.wait(LAST_RESORT_S) and second.finish_reason == "length"
    finally:
        engine.stop()


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    r = Request([0, 1], repetition_penalty=2.0)
    assert apply_penalties(logits, r, [3]).tolist() == [1.0, -2.0, 0.5, 1.5]
    r = Request([0], frequency_penalty=0.5, presence_penalty=1.0)
    assert apply_penalties(logits, r, [3, 3, 2]).tolist() == [2.0, -1.0, -1.0, 1.0]
    assert apply_penalties(logits, Request([0]), [1]) is logits
