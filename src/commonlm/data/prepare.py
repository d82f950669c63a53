"""Text to token shards: the one-time step between raw documents and training.

Worker processes (each with its own tokenizer, loaded from file) read, clean, hash and tokenize groups of
source items. The main process takes their results *in item order*, drops exact duplicates, puts each
document in train or val by its hash, and appends its tokens (plus end-of-text) to that split's shards.
So the output depends only on the inputs: never on the number of workers or how they were scheduled.
When the hash split misses the asked validation share by more than 2x (a few documents, or one file), the
tail of one split moves to the other until validation holds that share of the tokens (`_rebalance`).
No torch import here: spawned workers must start fast.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from commonlm.data.sources import SourceItem, SourceStats, list_items, no_documents_error, read_item, split_items
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError, already_exists
from commonlm.utils import atomic_dir, atomic_write_json, console, human

FORMAT, VERSION = "commonlm-tokens", 1
GROUP_BYTES = 8 << 20  # at most this much input per unit of work sent to a worker
MIN_GROUP_BYTES = 256 << 10  # and at least this much, so per-task overhead stays small
ENCODE_CHARS = 1 << 20  # text per encode_batch call inside a worker (bounds its memory)
MOVE_TOKENS = 1 << 20  # chunk size when tokens move between splits (decoded to count their bytes)


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class PrepareSummary:
    out: str
    documents_seen: int  # non-empty documents read, duplicates included
    duplicates: int
    decode_errors: int
    skipped_empty: int
    skipped_binary: int
    parse_errors: int
    input_bytes: int
    train_documents: int
    train_tokens: int
    val_documents: int  # documents wholly or partly in the split (a tail split cuts one in two)
    val_tokens: int
    val_split: str  # "documents" (by hash) or "tail" (rebalanced, see _rebalance)
    seconds: float
    workers: int

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------------
# Worker side: items -> hashed, tokenized documents


@dataclass
class _Chunk:
    """One group's documents, in order. A document's 128-bit hash gives its split score (first half,
    as a fraction of 2^64) and its dedup key (second half)."""

    scores: np.ndarray  # uint64
    keys: np.ndarray  # uint64
    nbytes: np.ndarray  # int64, UTF-8 bytes of each document
    ntokens: np.ndarray  # int64, tokens of each document including its end-of-text
    tokens: np.ndarray  # all documents' tokens, concatenated, in the output dtype
    stats: SourceStats
    size: int  # input bytes the group covered (for progress)


_STATE: dict = {}  # per worker process: the tokenizer and settings


def _init_worker(tokenizer_path: str, text_field: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no extra Rust threads
    _STATE["tok"] = Tokenizer.load(tokenizer_path)
    _STATE["text_field"] = text_field


def _tokenize_group(items: list[SourceItem]) -> _Chunk:
    tok: Tokenizer = _STATE["tok"]
    eot, stats = tok.eot_id, SourceStats()
    digests, nbytes, ntokens, flat, pending = bytearray(), [], [], [], []

    def flush() -> None:
        for ids in tok.encode_batch(pending):  # literal special-token strings stay plain text
            flat.extend(ids)
            flat.append(eot)
            ntokens.append(len(ids) + 1)
        pending.clear()

    pending_chars = 0
    for item in items:
        for text in read_item(item, _STATE["text_field"], stats):
            data = text.encode("utf-8")
            digests += hashlib.blake2b(data, digest_size=16).digest()
            nbytes.append(len(data))
            pending.append(text)
            pending_chars += len(text)
            if pending_chars >= ENCODE_CHARS:
                flush()
                pending_chars = 0
    flush()
    hashes = np.frombuffer(bytes(digests), dtype="<u8").reshape(-1, 2)
    return _Chunk(
        scores=hashes[:, 0].copy(),
        keys=hashes[:, 1].copy(),
        nbytes=np.array(nbytes, dtype=np.int64),
        ntokens=np.array(ntokens, dtype=np.int64),
        tokens=np.array(flat, dtype=token_dtype(tok.vocab_size)),
        stats=stats,
        size=sum(item.size for item in items),
    )


def _chunks(groups: list[list[SourceItem]], tokenizer_path: str, text_field: str, workers: int) -> Iterator[_Chunk]:
    """Tokenized groups in group order. One worker: in this process. More: a spawned pool (forking after
    the tokenizer has run can deadlock it), with a bounded number of groups in flight."""
    if workers == 1:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        _init_worker(tokenizer_path, text_field)
        try:
            for group in groups:
                yield _tokenize_group(group)
        finally:
            _STATE.clear()
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, text_field)) as pool:
        todo = iter(groups)
        in_flight = deque(pool.apply_async(_tokenize_group, (g,)) for g in islice(todo, 2 * workers))
        while in_flight:
            chunk = in_flight.popleft().get()
            for group in islice(todo, 1):
                in_flight.append(pool.apply_async(_tokenize_group, (group,)))
            yield chunk


def _group(items: list[SourceItem], target: int) -> list[list[SourceItem]]:
    groups, current, size = [], [], 0
    for item in items:
        if current and size + item.size > target:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    return groups + [current] if current else groups


# ---------------------------------------------------------------------------------------------------
# Main side: documents -> shards


@dataclass
class _Split:
    """One split being written: its shards and counts."""

    directory: Path
    name: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    _file: object = None
    _left: int = 0

    def write(self, arr: np.ndarray) -> None:
        pos = 0
        while pos < len(arr):
            if self._left == 0:
                self._next_shard()
            n = min(self._left, len(arr) - pos)
            arr[pos : pos + n].tofile(self._file)
            self.shards[-1]["tokens"] += n
            self._left -= n
            self.tokens += n
            pos += n

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.name}_{len(self.shards):04d}.bin"
        self._file = open(self.directory / name, "wb")  # closed by close()
        self.shards.append({"file": name, "tokens": 0})
        self._left = self.shard_tokens

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._left = None, 0

    def read(self, start: int, length: int) -> np.ndarray:
        self.close()
        parts, pos = [], 0
        for shard in self.shards:
            lo, hi = max(start, pos), min(start + length, pos + shard["tokens"])
            if lo < hi:
                mm = np.memmap(self.directory / shard["file"], dtype=self.dtype, mode="r")
                parts.append(np.array(mm[lo - pos : hi - pos]))
                del mm
            pos += shard["tokens"]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def truncate(self, keep: int) -> None:
        """Drop every token after the first `keep`, shortening or deleting shard files."""
        self.close()
        shards, pos = [], 0
        for shard in self.shards:
            path, n = self.directory / shard["file"], min(shard["tokens"], keep - pos)
            if n <= 0:
                path.unlink()
                continue
            if n < shard["tokens"]:
                os.truncate(path, n * self.dtype.itemsize)
                shard["tokens"] = n
            shards.append(shard)
            pos += n
        self.shards, self.tokens = shards, pos

    def summary(self) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def _add(split: _Split, chunk: _Chunk, mask: np.ndarray) -> None:
    """Append the chunk's documents selected by `mask` to `split`."""
    split.write(chunk.tokens[np.repeat(mask, chunk.ntokens)])
    split.documents += int(mask.sum())
    split.bytes += int(chunk.nbytes[mask].sum())


def _rebalance(train: _Split, val: _Split, fraction: float, tok: Tokenizer) -> bool:
    """Make validation hold `fraction` of the tokens when the split by document hash is far off (more than 2x
    either way) or left train empty: a single file is one document, so by hash it all went to one side.
    The tail of the split with too much moves to the other, cut mid-document if need be; the order of the
    input decides which tokens, so the result stays deterministic. Returns whether anything moved."""
    total = train.tokens + val.tokens
    # eval needs 2 tokens; training needs some too; below 4 tokens there is no val split at all
    target = min(max(2, round(fraction * total)), total - 2) if fraction > 0 and total >= 4 else 0
    if train.tokens and target / 2 <= val.tokens <= 2 * target:
        return False
    if val.tokens < target:
        _move_tail(train, val, target - val.tokens, tok)
    else:
        _move_tail(val, train, val.tokens - target, tok)
    return True


def _move_tail(src: _Split, dst: _Split, n: int, tok: Tokenizer) -> None:
    """Move the last `n` tokens of `src` to the end of `dst`, with their documents and bytes. A document cut
    in two counts in both splits; the bytes of the moved part come from decoding it (a character cut
    between chunks counts as U+FFFD: at most a few bytes off, for bits per byte)."""
    start = src.tokens - n
    cut = start > 0 and src.read(start - 1, 1)[0] != tok.eot_id  # the split keeps a document's head
    eots, nbytes = 0, 0
    for a in range(start, src.tokens, MOVE_TOKENS):
        part = src.read(a, min(MOVE_TOKENS, src.tokens - a))
        dst.write(part)
        eots += int((part == tok.eot_id).sum())
        nbytes += len(tok.decode(part.tolist(), skip_special=True).encode("utf-8"))
    src.truncate(start)
    src.documents, src.bytes = src.documents - eots + int(cut), src.bytes - nbytes
    dst.documents, dst.bytes = dst.documents + eots, dst.bytes + nbytes


class _Progress:
    """A rich progress bar over input bytes, or nothing when stderr is not a terminal."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.bar = Progress(
                TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TextColumn("{task.fields[docs]} docs"), console=console, transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("prepare", total=total, docs=0)

    def update(self, advance: int, docs: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, docs=human(docs))

    @contextmanager
    def shown(self) -> Iterator[_Progress]:
        if self.bar is None:
            yield self
        else:
            with self.bar:
                yield self


def prepare(
    inputs: list[str],
    tokenizer_path: str | Path,
    out: str | Path,
    val_fraction: float = 0.01,
    include: list[str] | None = None,
    text_field: str = "text",
    workers: int = 0,
    overwrite: bool = False,
    shard_tokens: int = 100_000_000,
    progress: bool = True,
) -> PrepareSummary:
    """Tokenize `inputs` into `out` (train/val shards + index.json + tokenizer copy), written atomically."""
    t0 = time.perf_counter()
    if not 0 <= val_fraction < 1:
        raise UserError(f"data: --val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise UserError(f"data: shard_tokens={shard_tokens} must be at least 1")
    out = Path(out)
    if out.exists() and not overwrite:
        raise already_exists("data", out)
    tok = Tokenizer.load(tokenizer_path)
    items = list_items(inputs, include)
    if out.exists():
        inside = [i.path for i in items if Path(i.path).resolve().is_relative_to(out.resolve())]
        if inside:
            raise UserError(f"data: input {inside[0]} is inside the output dir {out}; choose another --out")
    workers = workers if workers > 0 else os.cpu_count() or 1
    total = sum(i.size for i in items)
    target = max(MIN_GROUP_BYTES, min(GROUP_BYTES, total // (4 * workers) + 1))  # ~4 groups per worker
    groups = _group(split_items(items, target), target)
    workers = max(1, min(workers, len(groups)))
    dtype = token_dtype(tok.vocab_size)
    threshold = np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))
    stats, duplicates, seen = SourceStats(), 0, set()
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            train, val = (_Split(tmp, name, dtype, shard_tokens) for name in ("train", "val"))
            bar = _Progress(progress, total)
            with bar.shown():
                for chunk in _chunks(groups, str(tokenizer_path), text_field, workers):
                    stats.merge(chunk.stats)
                    keep = np.ones(len(chunk.keys), dtype=bool)
                    for i, key in enumerate(chunk.keys.tolist()):
                        if key in seen:
                            keep[i] = False
                        else:
                            seen.add(key)
                    duplicates += int((~keep).sum())
                    is_val = chunk.scores < threshold
                    _add(train, chunk, keep & ~is_val)
                    _add(val, chunk, keep & is_val)
                    bar.update(chunk.size, stats.documents)
            if train.documents + val.documents == 0:
                raise no_documents_error(inputs, include, text_field)
            val_split = "tail" if _rebalance(train, val, val_fraction, tok) else "documents"
            train.close()
            val.close()
            seconds = time.perf_counter() - t0
            index = {
                "format": FORMAT,
                "version": VERSION,
                "dtype": dtype.name,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "tokenizer_hash": tok.hash,
                "splits": {s.name: s.summary() for s in (train, val) if s.tokens > 0},
                "val_split": val_split,
                "stats": {
                    "documents_seen": stats.documents,
                    "duplicates": duplicates,
                    "decode_errors": stats.decode_errors,
                    "skipped_empty": stats.skipped_empty,
                    "skipped_binary": stats.skipped_binary,
                    "parse_errors": stats.parse_errors,
                    "input_bytes": stats.input_bytes,
                    "seconds": round(seconds, 3),
                },
                "source": {"inputs": list(inputs), "include": include, "text_field": text_field,
                           "val_fraction": val_fraction},
            }  # fmt: skip
            tok.save(tmp)
            atomic_write_json(tmp / "index.json", index)
    except FileExistsError as e:  # `out` appeared while we worked
        raise already_exists("data", out) from e
    summary = PrepareSummary(
        out=str(out), documents_seen=stats.documents, duplicates=duplicates, decode_errors=stats.decode_errors,
        skipped_empty=stats.skipped_empty, skipped_binary=stats.skipped_binary, parse_errors=stats.parse_errors,
        input_bytes=stats.input_bytes, train_documents=train.documents, train_tokens=train.tokens,
        val_documents=val.documents, val_tokens=val.tokens, val_split=val_split, seconds=seconds, workers=workers,
    )  # fmt: skip
    console.print(_describe(summary))
    return summary


def _describe(s: PrepareSummary) -> str:
    skipped = [f"{n} {what}" for n, what in ((s.skipped_empty, "empty"), (s.skipped_binary, "binary"),
                                             (s.parse_errors, "unparseable records")) if n]  # fmt: skip
    val = f", val {human(s.val_tokens)} tokens ({s.val_documents} docs)" if s.val_tokens else ", no val split"
    if s.val_tokens and s.val_split == "tail":
        val += " held out from the end, as the documents were too few or too unequal to split by document"
    return (
        f"Prepared {s.out}: {s.documents_seen - s.duplicates} documents "
        f"({s.duplicates} duplicates dropped, {s.decode_errors} with decode errors"
        f"{', skipped ' + ', '.join(skipped) if skipped else ''}); "
        f"train {human(s.train_tokens)} tokens ({s.train_documents} docs){val}. "
        f"{s.input_bytes / 1e6:.1f} MB in {s.seconds:.1f}s = {s.mb_per_s:.2f} MB/s on {s.workers} worker(s)."
    )
