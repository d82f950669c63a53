"""Prompts with answers for reinforcement learning with verifiable rewards (tune/grpo.py).

Input: jsonl lines `{"prompt": str, "answer": str}` or `{"messages": [...], "answer": str}` (the conversation
so far, ending before the assistant's turn). Each prompt is rendered with the tokenizer's chat template plus
the generation prompt (`Tokenizer.encode_chat`, so message text can never forge a turn): the ids the policy
continues. The answer is what a reward checker (tune/rewards.py) compares a completion with, as text.

Reading, checking, deduplication and the validation split are data/chat.py's. Prompt data is small (GSM8K
has 7.5k problems), so a split is one jsonl file `{split}_prompts.jsonl` of `{"ids", "prompt", "answer"}`
(`prompt`: the last user message's text, what a reward function is shown), read whole into memory.

    commonlm data prepare --format prompts --input problems.jsonl --tokenizer MODEL_DIR --out PROMPTS
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from commonlm.data.chat import _conversation, _key, _val_choice, check_prepare_args, read_records
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError, already_exists
from commonlm.utils import atomic_dir, atomic_write_json, console

FORMAT, VERSION = "prompts", 1


@dataclass
class Prompt:
    ids: list[int]  # the rendered conversation so far, ending with the assistant's turn header
    prompt: str  # the last user message's text
    answer: str


def read_prompts(inputs: list[str]) -> Iterator[tuple[str, list[dict[str, str]], str]]:
    """('file:line', messages, answer) for every non-blank line of the jsonl inputs, checked."""
    for where, record in read_records(inputs, "prompts"):
        if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
            raise UserError(f"prompts data: {where}: expected a JSON object with 'prompt' (or 'messages') and "
                            "'answer'")
        answer = record.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise UserError(f"prompts data: {where}: 'answer' must be a non-empty string (what the reward checks "
                            "a completion against)")
        if "messages" in record:
            messages = _conversation({"messages": record["messages"]}, where, reply=False)
        else:
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise UserError(f"prompts data: {where}: 'prompt' must be a non-empty string")
            messages = [{"role": "user", "content": record["prompt"]}]
        if messages[-1]["role"] == "assistant":
            raise UserError(f"prompts data: {where}: the conversation ends with an assistant turn; a prompt ends "
                            "where the assistant's reply is to be sampled")
        yield where, messages, answer


def prepare_prompts(inputs: list[str], tokenizer_dir: str | Path, out: str | Path, val_fraction: float = 0.01,
                    overwrite: bool = False) -> dict:
    """Render jsonl prompts with answers into `out` (per split `{split}_prompts.jsonl`, index.json, the
    tokenizer), atomically; duplicates (same conversation and answer) dropped. Returns index.json's content."""
    t0 = time.perf_counter()
    out = Path(out)
    tok = check_prepare_args(inputs, tokenizer_dir, out, val_fraction, overwrite, "prompts")
    items, keys, seen, total = [], [], set(), 0
    for _where, messages, answer in read_prompts(inputs):
        total += 1
        key = _key([*messages, {"role": "answer", "content": answer}])
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        users = [m["content"] for m in messages if m["role"] == "user"]
        items.append({"ids": tok.encode_chat(messages, add_generation_prompt=True),
                      "prompt": users[-1] if users else messages[-1]["content"], "answer": answer})
    if not items:
        raise UserError(f"data: no prompts in {', '.join(inputs)}")
    is_val, val_split = _val_choice(keys, val_fraction)
    splits = {"train": [p for p, v in zip(items, is_val) if not v], "val": [p for p, v in zip(items, is_val) if v]}
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for split, rows in splits.items():
                (tmp / f"{split}_prompts.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            index = {
                "format": FORMAT, "version": VERSION, "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash,
                "splits": {s: {"prompts": len(r), "longest": max((len(p["ids"]) for p in r), default=0)}
                           for s, r in splits.items()},
                "val_split": val_split, "stats": {"prompts_seen": total, "duplicates": total - len(items)},
                "source": {"inputs": list(inputs), "val_fraction": val_fraction},
            }  # fmt: skip
            tok.save(tmp)
            atomic_write_json(tmp / "index.json", index)
    except FileExistsError as e:  # `out` appeared while we worked
        raise already_exists("data", out) from e
    n_train, n_val = len(splits["train"]), len(splits["val"])
    console.print(f"Prepared prompts {out}: {len(items)} prompts ({total - len(items)} duplicates dropped); "
                  f"train {n_train}, " + (f"val {n_val}" + (" (the last ones)" if val_split == "tail" else "")
                                          if n_val else "no val") + f". {time.perf_counter() - t0:.1f}s.",
                  soft_wrap=True)
    return index


class PromptData:
    """A prompts data directory, read into memory: per split, a list of `Prompt`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        how = "prepare it with `commonlm data prepare --format prompts`"
        try:
            self.index: dict = json.loads((self.path / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"data: {self.path} is not a prompts data directory ({e}); {how}") from e
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise UserError(f"data: {self.path} is not prompts data (format={self.index.get('format')!r}); {how}")
        self.tokenizer_hash = str(self.index.get("tokenizer_hash"))
        self.splits: dict[str, list[Prompt]] = {}
        for split in self.index.get("splits", {}):
            file = self.path / f"{split}_prompts.jsonl"
            try:
                lines = file.read_text(encoding="utf-8").split("\n")  # (not splitlines: text may hold U+2028)
                self.splits[split] = [Prompt(**json.loads(line)) for line in lines if line.strip()]
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"data: {file} is missing or damaged ({e}); {how} again") from e

    def has_split(self, split: str) -> bool:
        return bool(self.splits.get(split))

    def prompts(self, split: str) -> list[Prompt]:
        if split not in self.splits:
            raise UserError(f"data: {self.path} has no '{split}' split (it has: {', '.join(self.splits)})")
        return self.splits[split]

    def check_tokenizer(self, tok: Tokenizer) -> None:
        """UserError if `tok` is not the tokenizer the prompts were rendered with."""
        if tok.hash != self.tokenizer_hash:
            raise UserError(f"data prepared with tokenizer {self.tokenizer_hash} but the model uses {tok.hash}: re-run "
                            f"`commonlm data prepare --format prompts` with the model's tokenizer (--tokenizer)")
