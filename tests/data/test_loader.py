"""Loader: exact windows of the token stream, resumable and rank-disjoint training batches, exact eval coverage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from commonlm.data.loader import TokenData, TrainBatches, eval_batches
from commonlm.data.prepare import prepare
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError


def build(root: Path, tok_dir: Path, docs: list[str], **kwargs) -> Path:
    (root / "in").mkdir(parents=True)
    (root / "in" / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    kwargs = {"val_fraction": 0.1, "workers": 1, "progress": False, **kwargs}
    prepare([str(root / "in" / "d.jsonl")], str(tok_dir), str(root / "data"), **kwargs)
    return root / "data"


@pytest.fixture
def data_dir(tmp_path, byte_dir, make_docs) -> Path:
    return build(tmp_path, byte_dir, make_docs(60), shard_tokens=997)  # windows often span shards


def stream(path: Path, split: str) -> np.ndarray:
    index = json.loads((path / "index.json").read_text())
    return np.concatenate(
        [np.fromfile(path / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    )


def test_token_data_reads_the_concatenated_stream(data_dir):
    data = TokenData(data_dir)
    ref = stream(data_dir, "train")
    assert len(data.index["splits"]["train"]["shards"]) > 3
    assert data.tokens("train") == len(ref) and data.dtype == np.uint16 and data.eot_id == 256
    assert data.vocab_size == Tokenizer.byte_level().vocab_size
    assert data.has_split("train") and data.has_split("val") and not data.has_split("test")
    assert data.bytes("train") == int((ref != 256).sum())
    for start, length in ((0, 10), (990, 20), (996, 1), (997, 1), (500, 2500), (len(ref) - 5, 5), (3, 0)):
        assert np.array_equal(data.read("train", start, length), ref[start : start + length])
    with pytest.raises(IndexError):
        data.read("train", len(ref) - 2, 3)
    with pytest.raises(UserError, match="no 'test' split"):
        data.tokens("test")


def test_train_batches_are_the_permuted_windows(data_dir):
    data, ref = TokenData(data_dir), stream(data_dir, "train")
    seq, bs, seed = 32, 5, 7
    batches = TrainBatches(data, seq, bs, seed)
    n = (len(ref) - 1) // seq
    assert batches.n_windows == n
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(3)])
    steps = (2 * n) // bs + 3  # into the third epoch
    for step in range(steps):
        x, y = batches.next()
        assert x.shape == y.shape == (bs, seq) and x.dtype == y.dtype == torch.int64
        for row, w in enumerate(order[step * bs : (step + 1) * bs]):
            window = torch.from_numpy(ref[w * seq : w * seq + seq + 1].astype(np.int64))
            assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])
    assert batches.epoch == 2
    assert batches.state_dict() == {"epoch": 2, "cursor": steps * bs - 2 * n}
    other = TrainBatches(data, seq, bs, seed + 1)
    assert not torch.equal(other.next()[0], TrainBatches(data, seq, bs, seed).next()[0])


def test_resume_continues_the_same_batches(data_dir):
    data = TokenData(data_dir)
    a = TrainBatches(data, 16, 4, seed=3)
    for _ in range(37):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next() for _ in range(50)]  # crosses an epoch boundary
    b = TrainBatches(data, 16, 4, seed=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next() for _ in range(50))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(UserError, match="seq_len changed"):
        TrainBatches(data, 16, 4, seed=3).load_state_dict({"epoch": 0, "cursor": 10**9})


def test_ranks_take_disjoint_blocks_of_the_same_sequence(data_dir):
    data = TokenData(data_dir)
    single = TrainBatches(data, 24, 6, seed=1)
    ranks = [TrainBatches(data, 24, 3, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(20):
        x, _ = single.next()
        x0, x1 = ranks[0].next()[0], ranks[1].next()[0]
        assert torch.equal(torch.cat([x0, x1]), x)
        rows0, rows1 = {tuple(r) for r in x0.tolist()}, {tuple(r) for r in x1.tolist()}
        assert not rows0 & rows1


def test_fewer_windows_than_a_global_batch(tmp_path, byte_dir):
    data = TokenData(build(tmp_path, byte_dir, ["abcdefghijklmnopqrstuvwxyz" * 2], val_fraction=0))
    ref = stream(tmp_path / "data", "train")  # 53 tokens -> 3 windows of 16+1
    seq, seed = 16, 5
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(3) for e in range(12)])
    ranks = [TrainBatches(data, seq, 4, seed, rank=r, world=2) for r in range(2)]
    for step in range(4):
        for r, batches in enumerate(ranks):
            x, y = batches.next()
            ws = order[step * 8 + r * 4 : step * 8 + r * 4 + 4]
            assert np.array_equal(x.numpy(), np.stack([ref[w * seq : w * seq + seq] for w in ws]))
            assert np.array_equal(y.numpy(), np.stack([ref[w * seq + 1 : w * seq + seq + 1] for w in ws]))
    assert ranks[0].state_dict() == {"epoch": 10, "cursor": 2}  # 32 windows = 10 epochs of 3, and 2


def test_too_small_split_says_what_to_do(tmp_path, byte_dir):
    data = TokenData(build(tmp_path, byte_dir, ["tiny"], val_fraction=0))  # 5 tokens
    with pytest.raises(UserError, match=r"has 5 tokens, fewer than one window of seq_len\+1=9.*train.seq_len=4"):
        TrainBatches(data, 8, 2, seed=0)
    x, y = TrainBatches(data, 4, 2, seed=0).next()
    assert x.shape == (2, 4)
    [(x, y)] = list(eval_batches(data, 16, 4, split="train"))  # eval still works, with one short window
    assert x.tolist() == [list(b"tiny")] and y.tolist() == [list(b"iny") + [256]]


def test_a_missing_val_split_says_why(tmp_path, byte_dir):
    """The advice was always "prepare with --val-fraction > 0", also to data prepared with 0.1."""
    none = TokenData(build(tmp_path / "a", byte_dir, ["some text"], val_fraction=0))
    with pytest.raises(UserError, match="has no 'val' split.*prepare it again with --val-fraction 0.01"):
        list(eval_batches(none, 16, 4))
    short = TokenData(build(tmp_path / "b", byte_dir, ["ab"], val_fraction=0.1))  # 3 tokens: none to spare
    with pytest.raises(UserError, match="has no 'val' split.*too short to hold any out"):
        list(eval_batches(short, 16, 4))
    with pytest.raises(UserError, match="has no 'test' split.*choose one of those"):
        list(eval_batches(short, 16, 4, split="test"))
    assert TokenData(build(tmp_path / "c", byte_dir, ["one document " * 20], val_fraction=0.1)).has_split("val")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("max_tokens", [0, 1, 100, 129, 10**9])
def test_eval_batches_predict_every_token_once(data_dir, world, max_tokens):
    data, ref = TokenData(data_dir), stream(data_dir, "val")
    seq, bs = 16, 3
    covered = len(ref) - 1 if max_tokens == 0 else min(max_tokens, len(ref) - 1)
    n_full, rest = divmod(covered, seq)
    predicted = np.zeros(len(ref), dtype=int)
    for rank in range(world):
        mine = list(range(rank, n_full, world))  # window w starts at token w*seq
        expected = [(mine[i : i + bs], seq) for i in range(0, len(mine), bs)]
        if rest and n_full % world == rank:
            expected.append(([n_full], rest))  # the short last window, alone
        got = list(eval_batches(data, seq, bs, max_tokens=max_tokens, rank=rank, world=world))
        assert len(got) == len(expected)
        for (x, y), (windows, length) in zip(got, expected):
            assert x.dtype == y.dtype == torch.int64
            assert np.array_equal(x.numpy(), np.stack([ref[w * seq : w * seq + length] for w in windows]))
            assert np.array_equal(y.numpy(), np.stack([ref[w * seq + 1 : w * seq + 1 + length] for w in windows]))
            for w in windows:
                predicted[w * seq + 1 : w * seq + 1 + length] += 1
    assert predicted[0] == 0 and (predicted[1 : covered + 1] == 1).all() and (predicted[covered + 1 :] == 0).all()


def test_eval_ranks_interleave_windows(data_dir):
    data = TokenData(data_dir)
    all_x = torch.cat([x for x, _ in eval_batches(data, 8, 100, max_tokens=64)])
    r1 = torch.cat([x for x, _ in eval_batches(data, 8, 100, max_tokens=64, rank=1, world=3)])
    assert torch.equal(r1, all_x[1::3])


def test_not_a_data_dir(tmp_path, data_dir):
    with pytest.raises(UserError, match="no index.json"):
        TokenData(tmp_path / "nowhere")
    index = json.loads((data_dir / "index.json").read_text())
    (data_dir / "index.json").write_text(json.dumps({**index, "format": "other"}))
    with pytest.raises(UserError, match="not a commonlm-tokens"):
        TokenData(data_dir)
    (data_dir / "index.json").write_text(json.dumps(index))
    shard = data_dir / index["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="expected"):
        TokenData(data_dir)
    shard.unlink()
    with pytest.raises(UserError, match="missing"):
        TokenData(data_dir)


def test_check_tokenizer(data_dir, bpe_dir):
    data = TokenData(data_dir)
    data.check_tokenizer(Tokenizer.load(data_dir))
    other = Tokenizer.load(bpe_dir)
    with pytest.raises(
        UserError, match=f"data prepared with tokenizer {data.tokenizer_hash} but model uses {other.hash}"
    ):
        data.check_tokenizer(other)
