"""prepare: deterministic shards, document-level split, end-of-text after every document, atomic output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import commonlm.data.prepare as prep
from commonlm.data.loader import TokenData
from commonlm.data.prepare import prepare
from commonlm.data.tokenizer import EOT, Tokenizer
from commonlm.errors import UserError

STDLIB_GLOBS = ["textwrap.py", "json/encoder.py", "string.py"]  # a little real code from the stdlib


def write_corpus(root: Path, docs: list[str]) -> Path:
    """Half the documents as .txt files, half as one jsonl file, plus two duplicates and junk lines."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, doc in enumerate(docs[:half]):
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    lines = [json.dumps({"text": d}) for d in docs[half:]] + ["{broken", json.dumps({"text": docs[0]})]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "copy.txt").write_text(docs[1], encoding="utf-8")
    return root


def split_stream(out: Path, split: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    if split not in index["splits"]:
        return np.empty(0, dtype=index["dtype"])
    return np.concatenate(
        [np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    )


def split_docs(out: Path, split: str) -> list[str]:
    """Decode a split made with the byte tokenizer: tokens are UTF-8 bytes, 256 is end-of-text."""
    stream = split_stream(out, split)
    if stream.size == 0:
        return []
    assert stream[-1] == 256
    cuts = np.flatnonzero(stream == 256)
    return [bytes(stream[a + 1 if i else 0 : b].astype(np.uint8)).decode() for i, (a, b) in
            enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]  # fmt: skip


def run(inputs, tok, out, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return prepare([str(i) for i in inputs], str(tok), str(out), **kwargs)


@pytest.fixture
def docs(make_docs):
    return make_docs(120) + [f"literal {EOT} stays text", "naïve 東京 😀", "x\n" * 50]


def test_every_document_once_with_eot_and_counts_match(tmp_path, byte_dir, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    s = run([corpus], byte_dir, tmp_path / "out", val_fraction=0.1)
    out = tmp_path / "out"
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert sorted(train + val) == sorted(docs)  # each doc exactly once: duplicates dropped, split by document
    assert not set(train) & set(val)
    assert 1 <= len(val) < 40
    assert s.duplicates == 2 and s.parse_errors == 1 and s.documents_seen == len(docs) + 2
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "commonlm-tokens" and index["dtype"] == "uint16" and index["eot_id"] == 256
    assert index["tokenizer_hash"] == Tokenizer.load(byte_dir).hash and index["val_split"] == "documents"
    assert Tokenizer.load(out).hash == index["tokenizer_hash"]  # the data dir carries its tokenizer
    for name, split in index["splits"].items():
        assert split["tokens"] == sum(sh["tokens"] for sh in split["shards"])
        for sh in split["shards"]:
            assert (out / sh["file"]).stat().st_size == 2 * sh["tokens"]
        texts = split_docs(out, name)
        assert split["documents"] == len(texts)
        assert split["bytes"] == sum(len(t.encode()) for t in texts)
        assert split["tokens"] == split["bytes"] + len(texts)  # bytes + one eot per document
    stats = index["stats"]
    assert (stats["duplicates"], stats["parse_errors"], stats["documents_seen"]) == (2, 1, len(docs) + 2)
    assert (s.train_tokens, s.val_tokens) == (index["splits"]["train"]["tokens"], index["splits"]["val"]["tokens"])


def test_workers_and_work_units_do_not_change_a_byte(tmp_path, bpe_dir, docs, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", docs)
    inputs = [corpus, "stdlib"]
    kwargs = dict(include=["*.txt", "*.jsonl", *STDLIB_GLOBS], shard_tokens=5000, val_fraction=0.05)
    run(inputs, bpe_dir, tmp_path / "one", **kwargs)
    monkeypatch.setattr(prep, "GROUP_BYTES", 4096)  # many small groups, and the jsonl cut into byte ranges
    monkeypatch.setattr(prep, "MIN_GROUP_BYTES", 1024)
    s2 = run(inputs, bpe_dir, tmp_path / "two", workers=2, **kwargs)
    assert s2.workers == 2
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir() if p.suffix == ".bin"}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir() if p.suffix == ".bin"}
    assert len(one) > 3 and one == two
    i1, i2 = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    i1["stats"].pop("seconds"), i2["stats"].pop("seconds")
    assert i1 == i2


def test_split_is_by_document_hash_not_input_order(tmp_path, byte_dir, make_docs):
    docs = make_docs(80)
    for name, order in (("fwd", docs), ("rev", docs[::-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in order))
        run([tmp_path / name / "d.jsonl"], byte_dir, tmp_path / f"out-{name}", val_fraction=0.2)
    fwd, rev = (split_docs(tmp_path / f"out-{n}", "val") for n in ("fwd", "rev"))
    assert 4 <= len(fwd) <= 32
    assert sorted(fwd) == sorted(rev)
    assert fwd == [d for d in docs if d in set(fwd)]  # within a split, input order is kept
    assert rev == [d for d in docs[::-1] if d in set(rev)]


def lands_in_val(text: str, fraction: float) -> bool:
    """Where the split by document hash puts a document (prepare's rule: the digest's first 8 bytes)."""
    score = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest()[:8], "little")
    return score < fraction * 2**64


def check_index(out: Path) -> dict:
    """index.json agrees with the shard files, and the data loads."""
    index = json.loads((out / "index.json").read_text())
    for split in index["splits"].values():
        assert split["tokens"] == sum(sh["tokens"] for sh in split["shards"])
        assert all((out / sh["file"]).stat().st_size == 2 * sh["tokens"] for sh in split["shards"])
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(
        sh["file"] for split in index["splits"].values() for sh in split["shards"])
    TokenData(out)
    return index


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_a_single_file_gets_the_asked_validation_share(tmp_path, byte_dir, fraction):
    """One text file is one document, so by hash it all went to one side ("no val split" at 0.1 too)."""
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(300))  # ASCII: a token per byte
    (tmp_path / "one.txt").write_text(text)
    s = run([tmp_path / "one.txt"], byte_dir, tmp_path / "out", val_fraction=fraction)
    total = len(text) + 1
    assert (s.val_tokens, s.train_tokens) == (round(fraction * total), total - round(fraction * total))
    assert (s.train_documents, s.val_documents, s.val_split) == (1, 1, "tail")
    train, val = split_stream(tmp_path / "out", "train"), split_stream(tmp_path / "out", "val")
    whole = np.array(list(text.encode()) + [256])
    assert np.array_equal(np.r_[train, val], whole) or np.array_equal(np.r_[val, train], whole)  # cut once
    index = check_index(tmp_path / "out")
    assert index["val_split"] == "tail"
    assert index["splits"]["train"]["bytes"] + index["splits"]["val"]["bytes"] == len(text)
    run([tmp_path / "one.txt"], byte_dir, tmp_path / "again", val_fraction=fraction)
    assert all((tmp_path / "again" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "out").glob("*.bin"))


def test_few_documents_get_the_asked_validation_share(tmp_path, byte_dir, make_docs):
    docs = make_docs(5)
    (tmp_path / "c").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "c" / f"{i}.txt").write_text(d)
    total = sum(len(d.encode()) + 1 for d in docs)
    # A tiny fraction puts nothing in val by hash: the last 2 tokens move there (eval needs 2), train is cut
    # across its 64-token shards.
    s = run([tmp_path / "c"], byte_dir, tmp_path / "tiny", val_fraction=1e-12, shard_tokens=64)
    assert (s.val_tokens, s.train_tokens, s.train_documents, s.val_documents) == (2, total - 2, 5, 1)
    index = check_index(tmp_path / "tiny")
    assert all(sh["tokens"] == 64 for sh in index["splits"]["train"]["shards"][:-1])
    assert split_stream(tmp_path / "tiny", "val")[-1] == 256
    # A fraction near 1 puts everything in val by hash: train still gets its share (2 tokens).
    s = run([tmp_path / "c"], byte_dir, tmp_path / "huge", val_fraction=0.999999)
    assert (s.train_tokens, s.val_tokens) == (2, total - 2)
    # No val when asked for none, or when there is too little text to hold any out.
    s = run([tmp_path / "c"], byte_dir, tmp_path / "none", val_fraction=0)
    assert s.val_documents == 0 and "val" not in json.loads((tmp_path / "none" / "index.json").read_text())["splits"]
    (tmp_path / "ab.txt").write_text("ab")
    s = run([tmp_path / "ab.txt"], byte_dir, tmp_path / "ab", val_fraction=0.5)
    assert (s.train_tokens, s.val_tokens) == (3, 0)


def test_a_large_document_in_val_is_trimmed_to_the_asked_share(tmp_path, byte_dir):
    """By hash a big document can take far more than asked: its head stays in val, its tail goes to train."""
    big = next(t for i in range(1000) if lands_in_val(t := f"big {i} " + "word " * 400, 0.2))
    small = [t for i in range(1000) if not lands_in_val(t := f"small document {i}", 0.2)][:4]
    (tmp_path / "c").mkdir()
    for i, text in enumerate([big, *small]):
        (tmp_path / "c" / f"{i}.txt").write_text(text)
    total = sum(len(t) + 1 for t in [big, *small])
    s = run([tmp_path / "c"], byte_dir, tmp_path / "out", val_fraction=0.2)
    assert (s.val_tokens, s.val_split) == (round(0.2 * total), "tail")
    assert split_docs(tmp_path / "out", "train")[:4] == small  # then the big document's tail
    check_index(tmp_path / "out")


def test_shards_roll_over_at_shard_tokens(tmp_path, byte_dir, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    run([corpus], byte_dir, tmp_path / "big", val_fraction=0)
    run([corpus], byte_dir, tmp_path / "small", val_fraction=0, shard_tokens=1000)
    shards = json.loads((tmp_path / "small" / "index.json").read_text())["splits"]["train"]["shards"]
    assert [s["file"] for s in shards[:2]] == ["train_0000.bin", "train_0001.bin"]
    assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert np.array_equal(split_stream(tmp_path / "small", "train"), split_stream(tmp_path / "big", "train"))


def test_uint32_tokens_for_a_large_vocabulary(tmp_path):
    tok = Tokenizer.byte_level()
    tok.tk.add_tokens([f"word{i}" for i in range(65600)])
    tok.save(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("say word65599 and word7")
    s = run([tmp_path / "a.txt"], tmp_path / "tok", tmp_path / "out", val_fraction=0)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] > 65536
    assert (tmp_path / "out" / "train_0000.bin").stat().st_size == 4 * s.train_tokens
    ids = split_stream(tmp_path / "out", "train").tolist()
    assert ids == Tokenizer.load(tmp_path / "tok").encode("say word65599 and word7") + [256]
    assert max(ids) > 65535


def test_existing_output_is_refused_and_untouched(tmp_path, byte_dir, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite"):
        run([corpus], byte_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no documents"):  # a failing overwrite leaves it untouched too
        run([tmp_path / "nothing"], byte_dir, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    run([corpus], byte_dir, out, overwrite=True)
    assert (out / "index.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "nothing", "out"]  # no temp dirs left


def test_input_inside_output_is_refused_on_overwrite(tmp_path, byte_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="inside the output"):
        run([tmp_path / "d"], byte_dir, tmp_path / "d", overwrite=True)
    assert (tmp_path / "d" / "a.txt").read_text() == "hello"


def test_missing_tokenizer_and_bad_settings(tmp_path, byte_dir):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="tokenizer"):
        run([tmp_path / "a.txt"], tmp_path / "no-tok", tmp_path / "out")
    with pytest.raises(UserError, match="val-fraction"):
        run([tmp_path / "a.txt"], byte_dir, tmp_path / "out", val_fraction=1.0)
    assert not (tmp_path / "out").exists()


def test_summary_is_printed(tmp_path, byte_dir, docs, capsys):
    corpus = write_corpus(tmp_path / "corpus", docs)
    run([corpus], byte_dir, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "2 duplicates" in err and "MB/s" in err and "train" in err
