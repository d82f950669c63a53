"""Chat data for supervised fine-tuning: jsonl conversations to token ids plus a loss mask, and the reader.

A conversation is rendered with the tokenizer's own chat template (`Tokenizer.encode_chat`, so the ids are
what transformers' `apply_chat_template` gives and message text can never forge a turn). Only what the
model should learn to say carries loss: every assistant turn's tokens, its end-of-turn token(s) included,
but not the template's header that opens the turn (the prompt supplies that at inference time).

The mask comes from rendering prefixes of the conversation, not from parsing the template: for assistant
message i the tokens between `encode_chat(messages[:i], add_generation_prompt=True)` and
`encode_chat(messages[:i+1], add_generation_prompt=False)` are its own. That holds for any template whose
renderings of a prefix are prefixes of the whole; a template that is not is refused rather than guessed at.

Output directory (written atomically): index.json, per split `{split}_tokens.bin` (ids, uint16/uint32),
`{split}_mask.bin` (uint8, 1 = the token is a target: it carries loss when predicted from the ones
before it) and `{split}_offsets.bin` (int64, conversations + 1 boundaries), plus a copy of the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from commonlm.data.prepare import token_dtype
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError, already_exists
from commonlm.utils import atomic_dir, atomic_write_json, console, human

FORMAT, VERSION = "chat", 1
ROLES = ("system", "user", "assistant")
MIN_HASH_SPLIT = 20  # below this many conversations a hash split is too coarse: hold out the last ones


# ---------------------------------------------------------------------------------------------------
# Reading and checking the input


def _conversation(record: object, where: str, reply: bool = True) -> list[dict[str, str]]:
    """The messages of one jsonl record, checked; `where` is 'file:line' for the error. With `reply` False, a
    conversation so far that waits for the assistant's reply (a prompt: no assistant turn needed)."""
    if not isinstance(record, dict):
        raise UserError(f"chat data: {where}: expected a JSON object with 'messages' or 'prompt' and 'completion'")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"chat data: {where}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]  # fmt: skip
    else:
        raise UserError(f"chat data: {where}: no 'messages' (nor 'prompt' and 'completion') in this line")
    out = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES:
            raise UserError(f"chat data: {where}: message {k} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"chat data: {where}: message {k} ({role}) has content {type(content).__name__}, "
                            "expected a string")  # fmt: skip
        if role == "assistant" and not content.strip():
            raise UserError(f"chat data: {where}: message {k} is an empty assistant turn (nothing to learn)")
        out.append({"role": role, "content": content})
    if reply and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"chat data: {where}: the conversation has no assistant turn (nothing to learn)")
    return out


def read_records(inputs: list[str], what: str = "chat") -> Iterator[tuple[str, object]]:
    """('file:line', parsed JSON) for every non-blank line of the jsonl inputs, in order; `what` names the
    kind of data in the errors."""
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{what} data: input {name} is not a file; give .jsonl files")
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{name}:{lineno}"
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{what} data: {where}: not JSON ({e})") from e
                yield where, record


def read_conversations(inputs: list[str]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """('file:line', messages) for every non-blank line of the jsonl inputs, in order."""
    for where, record in read_records(inputs):
        yield where, _conversation(record, where)


# ---------------------------------------------------------------------------------------------------
# Rendering


def render(tok: Tokenizer, messages: list[dict[str, str]], where: str = "",
           last_only: bool = False) -> tuple[list[int], list[int]]:
    """The conversation's ids and its mask (1 on every assistant turn's tokens, end-of-turn included; with
    `last_only`, on the last message's only: the reply a preference pair judges)."""
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i < len(messages) - 1):
            continue
        before = tok.encode_chat(messages[:i], add_generation_prompt=True)
        through = tok.encode_chat(messages[: i + 1], add_generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise UserError(
                f"chat data: {where + ': ' if where else ''}the chat template's rendering of the conversation up "
                f"to message {i} is not a prefix of the whole, so the assistant tokens cannot be told apart; "
                "use a tokenizer whose template renders turns one after another (like ChatML)"
            )
        mask[len(before) : len(through)] = [1] * (len(through) - len(before))
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ChatSummary:
    out: str
    conversations_seen: int
    duplicates: int
    train_conversations: int
    train_tokens: int
    train_target_tokens: int
    val_conversations: int
    val_tokens: int
    val_target_tokens: int
    val_split: str  # "hash" (by content) or "tail" (the last conversations, when too few to split by hash)
    seconds: float
    kind: str = "conversations"  # what conversations_seen and duplicates count: or "preference pairs" (2 each)


def _key(messages: list[dict[str, str]]) -> bytes:
    """128-bit hash of the conversation's content: first half = split score, the whole = dedup key."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _val_choice(keys: list[bytes], fraction: float) -> tuple[list[bool], str]:
    """Which conversations go to val: by hash, deterministic and stable as data is added; with few
    conversations, or when the hash leaves a split empty, the last ceil(fraction * n) (train keeps one)."""
    n = len(keys)
    if fraction <= 0 or n < 2:
        return [False] * n, "hash"
    threshold = min(int(fraction * 2**64), 2**64 - 1)
    by_hash = [int.from_bytes(k[:8], "little") < threshold for k in keys]
    if n >= MIN_HASH_SPLIT and 0 < sum(by_hash) < n:
        return by_hash, "hash"
    tail = min(math.ceil(fraction * n), n - 1)
    return [j >= n - tail for j in range(n)], "tail"


def _write_split(directory: Path, split: str, rows: list[tuple[list[int], list[int]]], dtype: np.dtype) -> dict:
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    tokens = np.fromiter((t for ids, _ in rows for t in ids), dtype=dtype, count=int(offsets[-1]))
    mask = np.fromiter((b for _, m in rows for b in m), dtype=np.uint8, count=int(offsets[-1]))
    tokens.tofile(directory / f"{split}_tokens.bin")
    mask.tofile(directory / f"{split}_mask.bin")
    offsets.tofile(directory / f"{split}_offsets.bin")
    return {"conversations": len(rows), "tokens": int(offsets[-1]), "target_tokens": int(mask.sum()),
            "longest": int(lengths.max(initial=0))}  # fmt: skip


def check_prepare_args(inputs: list[str], tokenizer_path: str | Path, out: Path, val_fraction: float,
                       overwrite: bool, fmt: str) -> Tokenizer:
    """The checks before rendering data with a chat template (--format `fmt`): the tokenizer, which has one."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"data: --val-fraction {val_fraction} must be in [0, 1)")
    if out.exists() and not overwrite:
        raise already_exists("data", out)
    if out.exists() and any(Path(i).resolve().is_relative_to(out.resolve()) for i in inputs):
        raise UserError(f"data: an input is inside the output dir {out}; choose another --out")
    tok = Tokenizer.load(tokenizer_path)
    if not tok.chat_template:
        raise UserError(f"data: the tokenizer in {tokenizer_path} has no chat template; --format {fmt} needs one")
    return tok


def prepare_chat(
    inputs: list[str],
    tokenizer_path: str | Path,
    out: str | Path,
    val_fraction: float = 0.01,
    overwrite: bool = False,
    preference: bool = False,
) -> ChatSummary:
    """Render jsonl conversations into `out` (tokens, loss mask, offsets per split + index.json + tokenizer).
    With `preference`, jsonl preference pairs instead (data/preference.py): conversation 2k is pair k's prompt
    and chosen reply, 2k + 1 the same prompt and its rejected reply, only the reply masked as a target; a pair
    is deduplicated and split as one, and index.json says "preference": true."""
    t0 = time.perf_counter()
    out = Path(out)
    tok = check_prepare_args(inputs, tokenizer_path, out, val_fraction, overwrite, "chat")
    dtype = token_dtype(tok.vocab_size)
    if preference:
        from commonlm.data.preference import read_pairs

        items = read_pairs(inputs)
    else:
        items = ((where, [messages]) for where, messages in read_conversations(inputs))
    rows, keys, seen, total = [], [], set(), 0  # rows: per item (conversation or pair), its rendered conversations
    for where, group in items:
        total += 1
        key = _key(group if preference else group[0])
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        rows.append([render(tok, messages, where, last_only=preference) for messages in group])
    if not rows:
        raise UserError(f"data: no conversations in {', '.join(inputs)}")
    is_val, val_split = _val_choice(keys, val_fraction)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            splits = {
                "train": _write_split(tmp, "train", [r for g, v in zip(rows, is_val) if not v for r in g], dtype),
                "val": _write_split(tmp, "val", [r for g, v in zip(rows, is_val) if v for r in g], dtype),
            }
            seconds = time.perf_counter() - t0
            index = {
                "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                "tokenizer_hash": tok.hash, "splits": splits, "val_split": val_split,
                "stats": {"conversations_seen": total, "duplicates": total - len(rows)},
                "source": {"inputs": list(inputs), "val_fraction": val_fraction}, "preference": preference,
            }  # fmt: skip
            tok.save(tmp)
            atomic_write_json(tmp / "index.json", index)
    except FileExistsError as e:  # `out` appeared while we worked
        raise already_exists("data", out) from e
    train, val = splits["train"], splits["val"]
    summary = ChatSummary(
        out=str(out), conversations_seen=total, duplicates=total - len(rows),
        train_conversations=train["conversations"], train_tokens=train["tokens"],
        train_target_tokens=train["target_tokens"], val_conversations=val["conversations"],
        val_tokens=val["tokens"], val_target_tokens=val["target_tokens"], val_split=val_split, seconds=seconds,
        kind="preference pairs" if preference else "conversations",
    )  # fmt: skip
    console.print(_describe(summary), soft_wrap=True)
    return summary


def _describe(s: ChatSummary) -> str:
    def part(name: str, n: int, tokens: int, targets: int) -> str:
        return f"{name} {n} conversations, {human(tokens)} tokens ({human(targets)} carry loss)"

    val = part("val", s.val_conversations, s.val_tokens, s.val_target_tokens) if s.val_conversations else "no val"
    if s.val_conversations and s.val_split == "tail":
        val += ", the last ones held out as they were too few to split by hash"
    return (f"Prepared chat data {s.out}: {s.conversations_seen - s.duplicates} {s.kind} "
            f"({s.duplicates} duplicates dropped); "
            f"{part('train', s.train_conversations, s.train_tokens, s.train_target_tokens)}; {val}. "
            f"{s.seconds:.1f}s.")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Reading a prepared directory


class ChatData:
    """A chat data directory, memory-mapped: per split, ids + loss mask + conversation offsets."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = self.path / "index.json"
        try:
            self.index: dict = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"data: {self.path} is not a chat data directory ({e}); "
                            "prepare one with `commonlm data prepare --format chat`") from e  # fmt: skip
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise UserError(f"data: {self.path} is not chat data (format={self.index.get('format')!r}, "
                            f"version={self.index.get('version')!r}); prepare it with `commonlm data prepare "
                            "--format chat`")  # fmt: skip
        try:
            self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
            self.tokenizer_hash = str(self.index["tokenizer_hash"])
            self._info: dict[str, dict] = {s: dict(v) for s, v in self.index["splits"].items()}
            self.preference = bool(self.index.get("preference", False))  # conversations 2k, 2k+1: pair k
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"data: {file} lacks {e}; re-run `commonlm data prepare --format chat`") from e
        self._maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for split, info in self._info.items():
            n, t = int(info["conversations"]), int(info["tokens"])
            self._maps[split] = (self._open(f"{split}_tokens.bin", self.dtype, t),
                                 self._open(f"{split}_mask.bin", np.dtype(np.uint8), t),
                                 self._open(f"{split}_offsets.bin", np.dtype("<i8"), n + 1))  # fmt: skip

    def _open(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        file = self.path / name
        size = file.stat().st_size if file.is_file() else None
        if size != count * dtype.itemsize:
            what = "is missing" if size is None else f"has {size} bytes, expected {count * dtype.itemsize}"
            raise UserError(f"data: {file} {what}; the data dir is incomplete, re-run `commonlm data prepare`")
        if count == 0:  # an empty file cannot be memory-mapped
            return np.zeros(0, dtype)
        return np.memmap(file, dtype=dtype, mode="r")

    def has_split(self, split: str) -> bool:
        return split in self._info and self.conversations(split) > 0

    def _need(self, split: str) -> dict:
        if split not in self._info:
            raise UserError(f"data: {self.path} has no '{split}' split (it has: {', '.join(self._info)})")
        return self._info[split]

    def conversations(self, split: str) -> int:
        return int(self._need(split)["conversations"])

    def tokens(self, split: str) -> int:
        return int(self._need(split)["tokens"])

    def target_tokens(self, split: str) -> int:
        return int(self._need(split)["target_tokens"])

    def conversation(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation i of the split: (ids as int64, mask as bool; True = a target that carries loss)."""
        n = self.conversations(split)
        if not 0 <= i < n:
            raise IndexError(f"conversation {i} outside the {n} of split {split!r}")
        tokens, mask, offsets = self._maps[split]
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        return tokens[lo:hi].astype(np.int64), mask[lo:hi].astype(bool)

    def check_tokenizer(self, tok: Tokenizer) -> None:
        """UserError if `tok` is not the tokenizer the data was prepared with."""
        if tok.hash != self.tokenizer_hash:
            raise UserError(
                f"data prepared with tokenizer {self.tokenizer_hash} but model uses {tok.hash}: re-run "
                f"`commonlm data prepare --format chat` with the model's tokenizer (--tokenizer), or fine-tune "
                f"with the tokenizer saved in {self.path}"
            )
