"""Passkey retrieval: a five-digit key hidden in filler text, asked for at the end (a long-context check).

A model that can use its whole context finds the key wherever it sits; one that cannot (positions it never
trained on, a scaling that blurs them) answers at chance, which for five digits is ~0. The documents are plain
filler sentences, cycled, with one line holding the key at a chosen depth, then the question:

    The river runs down to the sea. ... The pass key is 40721. Remember it. 40721 is the pass key. ...
    What is the pass key? The pass key is 40721

Two uses, from the same generator: a training corpus (`write_corpus`: jsonl for `commonlm data prepare`) so a
small model learns the skill at its own context, and the named evaluation task `passkey:LEN`
(`commonlm eval MODEL --task passkey:1024`): prompts of at most LEN tokens with room for the answer, keys at
depths spread from the start to the end, scored by greedy decoding and an exact match on the digits.

Lengths are counted by `count` (a tokenizer's token count); by default in characters. The text is ASCII, so
characters are bytes: a document of LEN characters is LEN tokens for the byte tokenizer, and no more than LEN
for a byte-level BPE (each token holds at least one byte), so `passkey:LEN` always fits a context of LEN.

Retrieval is copying from far back (an induction circuit: find the earlier "pass key is", copy what followed), and a
document of passkey text teaches it through five digits in a few hundred bytes, the rest being filler a small model
memorises. Small byte-level models trained on that alone stayed at chance on the key's digits (bench/
context_extension.py). So the corpus can mix in copy drills (`copy_drill`: random strings, each written twice),
where half of every document can only be predicted by copying: with them (and Muon) a 2-layer model learns to copy
within a few hundred steps and then retrieves the key.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from commonlm.errors import UserError

FILLER = ["The river runs down to the sea.", "Grass grows on the hill.", "The clock on the wall ticks.",
          "A cat sleeps in the sun.", "Rain falls and the road is wet.", "The bread is warm."]
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_ROOM = 8  # evaluation: tokens left after the prompt for " NNNNN" (6 bytes) and a little more
DEPTHS = 11  # evaluation items cycle through depths 0, 0.1, ..., 1.0
DRILL_CHARS = string.ascii_lowercase + string.digits  # what copy drills are written in


@dataclass(frozen=True)
class Passkey:
    prompt: str  # filler with the key line at its depth, then the question (no space after it)
    key: str  # five digits
    depth: float  # the share of the filler sentences before the key line

    @property
    def text(self) -> str:
        """The whole document: the prompt answered."""
        return f"{self.prompt} {self.key}"


def passkey(length: int, depth: float, rng: random.Random, count: Callable[[str], int] = len,
            room: int = 0) -> Passkey:
    """One document: as many filler sentences as fit `length` (by `count`), leaving `room` after the prompt
    (0: the document, prompt and answer, fits `length`), with the key line after `depth` of them."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = f"{rng.randrange(10**5):05d}"
    start = rng.randrange(len(FILLER))  # where the cycle of sentences starts

    def build(n: int) -> Passkey:
        filler = [FILLER[(start + i) % len(FILLER)] for i in range(n)]
        before = round(depth * n)
        lines = filler[:before] + [KEY_LINE.format(key=key)] + filler[before:] + [QUESTION]
        return Passkey(" ".join(lines), key, before / n if n else depth)

    def size(doc: Passkey) -> int:
        return count(doc.prompt) + room if room else count(doc.text)

    bare = size(build(0))
    if bare > length:
        raise UserError(f"passkey: a length of {length} holds no document (the key line and question alone take "
                        f"{bare}); use at least {bare}")
    mean = sum(count(" " + s) for s in FILLER) / len(FILLER)
    n = int((length - bare) / mean)  # about right; then one sentence at a time to the most that fit
    while n > 0 and size(build(n)) > length:
        n -= 1
    while size(build(n + 1)) <= length:
        n += 1
    return build(n)


def passkeys(n: int, length: int, seed: int = 0, count: Callable[[str], int] = len, room: int = 0,
             min_length: int | None = None) -> list[Passkey]:
    """`n` documents, seeded. Evaluation (`min_length` None): all of `length`, depths cycling through 0, 0.1,
    ..., 1.0. Training: lengths drawn from `min_length` to `length` and depths from [0, 1], so the keys lie at
    every distance the context allows."""
    rng = random.Random(f"passkey:{seed}:{length}:{min_length}")
    docs = []
    for i in range(n):
        if min_length is None:
            docs.append(passkey(length, (i % DEPTHS) / (DEPTHS - 1), rng, count, room))
        else:
            docs.append(passkey(rng.randint(min_length, length), rng.random(), rng, count, room))
    return docs


def copy_drill(length: int, rng: random.Random) -> str:
    """Random strings of 8 to 24 characters, each written twice ("k3f9xq2m = k3f9xq2m."), as many pairs as fit
    `length` characters: nothing in it can be memorised, so the second string of each pair is predictable only by
    copying the first."""
    pairs: list[str] = []
    while True:
        word = "".join(rng.choice(DRILL_CHARS) for _ in range(rng.randint(8, 24)))
        pair = f"{word} = {word}."
        if pairs and len(" ".join([*pairs, pair])) > length:
            return " ".join(pairs)
        pairs.append(pair)


def write_corpus(path: str | Path, n: int, length: int, seed: int = 0, min_length: int = 0,
                 copies: float = 0.0) -> Path:
    """A jsonl of `n` documents ({"text": ...}) of `min_length` (default: a quarter of `length`, or the shortest
    passkey document there is) to `length` characters, for `commonlm data prepare` (which splits off the validation
    documents: --val-fraction): passkey documents, and a share `copies` of copy drills (`copy_drill`) among them at
    seeded places (0: none, the corpus of earlier versions)."""
    from commonlm.utils import write_jsonl

    if not 0.0 <= copies < 1.0:
        raise UserError(f"passkey corpus: copies={copies} is the share of copy drills among the documents; use a "
                        "number in [0, 1)")
    shortest = len(Passkey(f"{KEY_LINE.format(key='00000')} {QUESTION}", "00000", 0.0).text)
    low = min_length or min(length, max(length // 4, shortest))
    texts = [d.text for d in passkeys(n, length, seed, min_length=low)]
    rng = random.Random(f"passkey-copies:{seed}:{length}")
    for i in sorted(rng.sample(range(n), round(n * copies))):
        texts[i] = copy_drill(rng.randint(low, length), rng)
    write_jsonl(path, [{"text": t} for t in texts])
    return Path(path)


def passkey_task(name: str, items: int = 110, seed: int = 1234):
    """The named task `passkey:LEN`: `items` prompts of at most LEN - ANSWER_ROOM characters (so the prompt and
    the answer fit a context of LEN tokens), generated on the spot, seeded; greedy decoding, the first number in
    the completion must be the key. A prompt longer than the model's context is an error, not cut."""
    from commonlm.evaluate.tasks import Item, Task

    _, _, text = name.partition(":")
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--task {name}: expected passkey:LEN with LEN the longest prompt, in tokens (a positive "
                        "integer), e.g. passkey:1024")
    length = int(text)
    docs = passkeys(items, length, seed, room=ANSWER_ROOM)
    made = [Item(where=f"{name}:{i} (depth {d.depth:.2f})", context=d.prompt, targets=[d.key])
            for i, d in enumerate(docs)]
    return Task(name=name, kind="generate", items=made, pool=made, metric="exact", stop=["\n"],
                max_tokens=ANSWER_ROOM, output_regex=r"\d+", source=name, cut=False)
