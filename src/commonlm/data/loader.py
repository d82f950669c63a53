"""Token shards to batches: a memory-mapped view of a prepared data dir, the resumable training stream,
and exact-coverage evaluation windows.

Training state is two integers (epoch, cursor) into one endless sequence of window indices, so resuming
a run, or changing the number of processes, continues the very same sequence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from commonlm.errors import UserError

FORMAT, VERSION = "commonlm-tokens", 1


class TokenData:
    """A prepared data directory: index.json + memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = self.path / "index.json"
        if not file.is_file():
            raise UserError(
                f"data: {self.path} is not a prepared data directory (no index.json); "
                "create one with `commonlm data prepare`"
            )
        try:
            self.index: dict = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"data: cannot read {file} ({e}); re-run `commonlm data prepare`") from e
        if self.index.get("format") == "chat":
            raise UserError(f"data: {self.path} is chat data (for `commonlm tune sft`), not text for pretraining; "
                            "prepare text with `commonlm data prepare` without --format chat")  # fmt: skip
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise UserError(
                f"data: {file} is not a {FORMAT} v{VERSION} index "
                f"(format={self.index.get('format')!r}, version={self.index.get('version')!r}); "
                "re-run `commonlm data prepare`"
            )
        try:
            self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
            self.vocab_size = int(self.index["vocab_size"])
            self.eot_id = int(self.index["eot_id"])
            self.tokenizer_hash = str(self.index["tokenizer_hash"])
            splits = self.index["splits"]
        except (KeyError, TypeError) as e:
            raise UserError(f"data: {file} lacks {e}; re-run `commonlm data prepare`") from e
        if self.dtype.name not in ("uint16", "uint32"):
            raise UserError(f"data: {file} has dtype {self.dtype.name}; expected uint16 or uint32")
        self._shards: dict[str, list[np.ndarray]] = {}
        self._ends: dict[str, np.ndarray] = {}  # cumulative end offset of each shard in the split's stream
        for split, info in splits.items():
            maps = [self._open(shard) for shard in info["shards"]]
            self._shards[split] = maps
            self._ends[split] = np.cumsum([len(m) for m in maps], dtype=np.int64)
            if self.tokens(split) != info["tokens"]:
                raise UserError(f"data: {split} shards of {self.path} hold {self.tokens(split)} tokens but index.json "
                                f"says {info['tokens']}; re-run `commonlm data prepare`")  # fmt: skip

    def _open(self, shard: dict) -> np.ndarray:
        file = self.path / shard["file"]
        expected = int(shard["tokens"]) * self.dtype.itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            what = "is missing" if size is None else f"has {size} bytes, expected {expected}"
            raise UserError(f"data: shard {file} {what}; the data dir is incomplete, re-run `commonlm data prepare`")
        if expected == 0:  # an empty file cannot be memory-mapped
            return np.empty(0, self.dtype)
        return np.memmap(file, dtype=self.dtype, mode="r")

    def has_split(self, split: str) -> bool:
        return split in self._shards and self.tokens(split) > 0

    def _need(self, split: str) -> None:
        if split not in self._shards:
            # prepare holds out validation tokens whenever asked to, unless the text has under 4 tokens
            asked = (self.index.get("source") or {}).get("val_fraction")
            how = ("choose one of those" if split != "val"
                   else "its text was too short to hold any out: add text" if asked
                   else "prepare it again with --val-fraction 0.01 for a validation split")
            raise UserError(f"data: {self.path} has no '{split}' split (it has: {', '.join(self._shards) or 'none'}); "
                            f"{how}")

    def tokens(self, split: str) -> int:
        """Total tokens in a split."""
        self._need(split)
        ends = self._ends[split]
        return int(ends[-1]) if len(ends) else 0

    def bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's documents (for bits per byte)."""
        self._need(split)
        return int(self.index["splits"][split]["bytes"])

    def read(self, split: str, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's concatenated stream (read-only; may span shards)."""
        total = self.tokens(split)
        if start < 0 or length < 0 or start + length > total:
            raise IndexError(f"read({split!r}, {start}, {length}) outside a stream of {total} tokens")
        ends, shards = self._ends[split], self._shards[split]
        i = int(np.searchsorted(ends, start, side="right"))
        if length == 0:
            return np.empty(0, self.dtype)
        parts = []
        while length > 0:
            lo = start - (int(ends[i - 1]) if i else 0)
            piece = np.asarray(shards[i][lo : lo + length])
            parts.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def windows(self, split: str, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of `length` tokens starting at each of `starts`, as one [len(starts), length] array."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        ends, shards = self._ends[split], self._shards[split]
        which = np.searchsorted(ends, starts, side="right")
        inside = starts + length <= ends[np.minimum(which, len(ends) - 1)]
        offsets = np.arange(length)
        for shard in np.unique(which[inside]):
            rows = np.flatnonzero(inside & (which == shard))
            base = int(ends[shard - 1]) if shard else 0
            out[rows] = shards[shard][(starts[rows] - base)[:, None] + offsets]
        for row in np.flatnonzero(~inside):  # the rare window that spans two shards
            out[row] = self.read(split, int(starts[row]), length)
        return out

    def check_tokenizer(self, tok) -> None:
        """UserError if `tok` (a commonlm Tokenizer) is not the one the data was prepared with."""
        if tok.hash != self.tokenizer_hash:
            raise UserError(
                f"data prepared with tokenizer {self.tokenizer_hash} but model uses {tok.hash}: re-run "
                f"`commonlm data prepare` with the model's tokenizer (--tokenizer), or train with the tokenizer "
                f"saved in {self.path}"
            )


def _to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TrainBatches:
    """Deterministic, resumable stream of training batches.

    The split's token stream is cut into windows of seq_len+1 tokens at stride seq_len
    (n_windows = (tokens-1)//seq_len). Window order is a permutation per epoch drawn from
    np.random.default_rng([seed, epoch]); the permutations of successive epochs form one endless
    sequence. Each call to next() consumes world*batch_size windows from that sequence: rank r takes
    the r-th block of batch_size. State is just {epoch, cursor}.
    """

    def __init__(
        self,
        data: TokenData,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
    ):
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"TrainBatches: bad seq_len={seq_len}, batch_size={batch_size}, rank={rank}/{world}")
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.rank, self.world, self.split = rank, world, split
        tokens = data.tokens(split)
        if tokens < seq_len + 1:
            raise UserError(
                f"{split} split of {data.path} has {tokens} tokens, fewer than one window of "
                f"seq_len+1={seq_len + 1}: add data or lower train.seq_len (--set train.seq_len={max(1, tokens - 1)})"
            )
        self.n_windows = (tokens - 1) // seq_len
        self._epoch, self._cursor = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), cached

    @property
    def epoch(self) -> int:
        return self._epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def _take(self, count: int) -> np.ndarray:
        """The next `count` window indices of the endless sequence; advances the state."""
        parts = []
        while count > 0:
            n = min(count, self.n_windows - self._cursor)
            parts.append(self._permutation(self._epoch)[self._cursor : self._cursor + n])
            self._cursor += n
            count -= n
            if self._cursor == self.n_windows:
                self._epoch, self._cursor = self._epoch + 1, 0
        return np.concatenate(parts)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, seq_len], y = x shifted by one."""
        block = self._take(self.world * self.batch_size)
        mine = block[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _to_xy(self.data.windows(self.split, mine * self.seq_len, self.seq_len + 1))

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.n_windows:
            raise UserError(
                f"data: saved loader position (epoch {epoch}, window {cursor}) does not fit {self.n_windows} "
                f"windows of the {self.split} split of {self.data.path}: the data or train.seq_len changed"
            )
        self._epoch, self._cursor = epoch, cursor


def eval_batches(
    data: TokenData,
    seq_len: int,
    batch_size: int,
    split: str = "val",
    max_tokens: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering the split: every token after the first is predicted exactly once
    (the last window may be shorter than seq_len and comes as its own batch). max_tokens>0 caps how many
    predicted tokens are covered (from the start of the split, deterministic). Rank r takes windows r, r+W, ...
    Summing loss*count over all ranks' batches gives the exact mean over the covered tokens."""
    tokens = data.tokens(split)
    if tokens < 2:
        raise UserError(f"data: {split} split of {data.path} has {tokens} token(s); evaluation needs at least 2")
    predicted = tokens - 1 if max_tokens <= 0 else min(tokens - 1, max_tokens)
    n_full, rest = divmod(predicted, seq_len)
    mine = np.arange(rank, n_full, world, dtype=np.int64)
    for i in range(0, len(mine), batch_size):
        yield _to_xy(data.windows(split, mine[i : i + batch_size] * seq_len, seq_len + 1))
    if rest and n_full % world == rank:  # the short last window is window number n_full
        yield _to_xy(data.read(split, n_full * seq_len, rest + 1)[None, :])
