"""A synthetic arithmetic task for fine-tuning demos and tests: 'a+b' (or - and *) on numbers of a few digits,
seeded, in the three input formats of `commonlm data prepare`: chat records for `tune sft`, preference pairs
for `tune dpo` (the right answer preferred to a near miss) and prompts with answers for `tune grpo` (checked
by the gsm8k reward: the completion's final number). Small enough that a model of a few hundred thousand
parameters learns it on a CPU in seconds, and verifiable, which is what RL with rewards needs.

    from commonlm.data.arithmetic import problems, prompt_records
    from commonlm.utils import write_jsonl
    write_jsonl("prompts.jsonl", prompt_records(problems(500, seed=0)))
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass(frozen=True)
class Problem:
    question: str  # "12+7"
    answer: str  # "19"


def problems(n: int, seed: int = 0, digits: int = 2, ops: str = "+") -> list[Problem]:
    """`n` problems with operands of 1 to `digits` digits and an operator from `ops`, seeded (repeats possible
    when the space is small)."""
    if digits < 1 or not ops or any(op not in OPS for op in ops):
        raise ValueError(f"digits must be >= 1 and ops made of {''.join(OPS)}; got {digits}, {ops!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        op = rng.choice(ops)
        out.append(Problem(f"{a}{op}{b}", str(OPS[op](a, b))))
    return out


def sft_records(items: list[Problem]) -> list[dict]:
    """Chat records: the question as the user's turn, the bare answer as the assistant's."""
    return [{"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]}
            for p in items]


def preference_records(items: list[Problem], seed: int = 0) -> list[dict]:
    """Preference pairs: the right answer chosen, the answer off by a small non-zero amount rejected."""
    rng = random.Random(seed)
    return [{"prompt": p.question, "chosen": p.answer,
             "rejected": str(int(p.answer) + rng.choice([-2, -1, 1, 2]))} for p in items]


def prompt_records(items: list[Problem]) -> list[dict]:
    """Prompts with answers, for `tune grpo --reward gsm8k`."""
    return [{"prompt": p.question, "answer": p.answer} for p in items]
