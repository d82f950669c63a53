"""Scoring tasks (evaluate/tasks.py) on a model: batched log-likelihoods, and greedy answers from the one engine.

Log-likelihoods are computed as lm-evaluation-harness does, so numbers compare: the context and continuation
are encoded together and the continuation is the tail of that encoding past the context's own tokens
(whitespace at the end of the context moves to the continuation first, so " Paris" is scored as the word
with its space); an empty context starts from the end-of-text token; a row longer than the model's context
loses its beginning. Rows are sorted by length, right-padded into batches, one forward pass per batch, and
only the continuation's positions are read (padding on the right changes nothing before it, causally): the
head, over the whole vocabulary, runs on those positions alone.

Multiple choice reports `acc` (the most likely choice is right) and `acc_norm` (log-likelihood divided by the
choice's length in characters, as the harness does); BIG-bench's partial credits count as they are. Cloze
reports `acc` (greedy decoding gives the target exactly: every continuation token is the argmax) and the
perplexity of the targets. Generation goes through infer/engine.py (greedy, batched, KV-cached), stops at the
model's stop ids, and is cut at the task's stop strings afterwards; checkers come from tune/rewards.py.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.tasks import Item, Task, limited
from commonlm.infer.engine import Engine, Request
from commonlm.tune.rewards import exact, gsm8k

CHECKERS = {"gsm8k": gsm8k, "exact": exact}
LOGITS_BUDGET = 1 << 27  # logits per forward pass (rows x positions x vocabulary): 512 MiB in fp32


@dataclass
class TaskResult:
    name: str
    kind: str
    items: int
    metrics: dict[str, float]
    chance: float
    truncated: int = 0  # items whose prompt lost its beginning to fit the model's context
    seconds: float = 0.0
    family: str | None = None
    per_item: list[dict] = field(default_factory=list)

    def as_dict(self, per_item: bool = False) -> dict:
        """The scores; with per_item, each item's too (its file:line, log-likelihoods and picks, or answer)."""
        out = {"task": self.name, "kind": self.kind, "items": self.items, **self.metrics, "chance": self.chance,
               "truncated": self.truncated, "seconds": round(self.seconds, 3)}
        return {**out, "per_item": self.per_item} if per_item else out


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), the continuation being the tail of encoding both together."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context) if context else []
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        context_ids = [tokenizer.eot_id]
    return context_ids, continuation_ids


@torch.inference_mode()
def loglikelihoods(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]],
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding gives it) for each (context ids,
    continuation ids), in order. Rows with the same input (one-token choices of one question: MMLU's letters)
    share one row of the forward pass."""
    max_len = model.config.max_seq_len
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    rows: dict[tuple[int, ...], list[int]] = {}  # input ids -> the pairs that read that row's logits
    targets = []
    for i, (context, continuation) in enumerate(pairs):
        ids = (context + continuation)[-(max_len + 1):]
        rows.setdefault(tuple(ids[:-1]), []).append(i)
        targets.append(ids[-len(continuation):])
    order = sorted(rows, key=len, reverse=True)
    most = {inputs: max(len(targets[i]) for i in ids) for inputs, ids in rows.items()}  # positions each row reads
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    start = 0
    while start < len(order):
        kept = max(most[inputs] for inputs in order[start : start + batch_size])
        fits = max(1, min(batch_size, LOGITS_BUDGET // max(1, kept * vocab)))
        batch = order[start : start + fits]
        start += len(batch)
        kept = max(most[inputs] for inputs in batch)
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for r, inputs in enumerate(batch):
            x[r, : len(inputs)] = torch.tensor(inputs)
        # each row's last `kept` positions before its padding (clamped at 0 for a row shorter than that)
        keep = torch.tensor([[max(0, len(inputs) - kept + j) for j in range(kept)] for inputs in batch])
        logits = _logits_at(model, x.to(device), keep.to(device))
        for r, inputs in enumerate(batch):
            logp = logits[r, kept - most[inputs] :].float().log_softmax(-1)
            for i in rows[inputs]:
                want = torch.tensor(targets[i], device=logp.device)
                mine = logp[most[inputs] - len(want):]
                total = mine.gather(-1, want[:, None]).sum().item()
                results[i] = (total, bool((mine.argmax(-1) == want).all()))
    return results


def _logits_at(model: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The logits [B, K, V] of the inputs `x` [B, T] at positions `keep` [B, K] only: the head (and the vocabulary
    it spans) runs on those positions alone."""
    return model(x, keep=keep)[0]


def check_encodable(tokenizer: Tokenizer, text: str, ids: list[int], where: str) -> None:
    """UserError when the tokenizer cannot encode `text` (nothing for a non-empty text, or its unknown token)."""
    unk_token = getattr(tokenizer.tk.model, "unk_token", None)
    unk = tokenizer.token_id(unk_token) if unk_token else None
    if (text and not ids) or (unk is not None and unk in ids and unk_token not in text):
        raise UserError(f"{where}: the model's tokenizer cannot encode this item's text ({text[:60]!r}...): its "
                        "vocabulary has no tokens for some characters; evaluate a model whose tokenizer covers them")


def score_task(model: torch.nn.Module, tokenizer: Tokenizer, task: Task, few_shot: int | None = None,
               limit: int | None = None, batch_size: int = 16) -> TaskResult:
    """Score `task` (its first `limit` items, spread over it) with `few_shot` examples (default: the task's)."""
    started = time.perf_counter()
    k = task.few_shot if few_shot is None else few_shot
    items = limited(task.items, limit)
    run = {"choice": _choice, "cloze": _cloze, "generate": _generate}[task.kind]
    metrics, per_item, truncated = run(model, tokenizer, task, items, k, batch_size)
    return TaskResult(task.name, task.kind, len(items), metrics, task.chance, truncated,
                      time.perf_counter() - started, task.family, per_item)


def _pairs(tokenizer: Tokenizer, model, items: list[Item], requests: list[list[tuple[str, str]]]):
    """Encoded (context, continuation) pairs for every item's (prompt, continuation) texts, and how many items
    lose their start."""
    max_len = model.config.max_seq_len
    pairs, truncated = [], 0
    for item, texts in zip(items, requests):
        cut = False
        for prompt, text in texts:
            context_ids, continuation_ids = encode_pair(tokenizer, prompt, text)
            check_encodable(tokenizer, prompt + text, context_ids + continuation_ids, item.where)
            if not continuation_ids:
                raise UserError(f"{item.where}: the choice or target {text!r} is empty; give it some text")
            if len(continuation_ids) >= max_len:
                raise UserError(f"{item.where}: the choice or target {text[:40]!r} alone is {len(continuation_ids)}"
                                f" tokens, more than the model's context of {max_len} leaves after the prompt")
            cut |= len(context_ids) + len(continuation_ids) > max_len + 1
            pairs.append((context_ids, continuation_ids))
        truncated += cut
    return pairs, truncated


def _choice(model, tokenizer, task, items, k, batch_size):
    requests = []
    for item in items:
        contexts = item.contexts or [item.context] * len(item.choices)  # (a blank: each choice's own context)
        requests.append([(task.prompt(item, k, context), choice) for context, choice in zip(contexts, item.choices)])
    pairs, truncated = _pairs(tokenizer, model, items, requests)
    scores = iter(loglikelihoods(model, pairs, batch_size))
    acc = acc_norm = 0.0
    per_item = []
    for item in items:
        lls = [next(scores)[0] for _ in item.choices]
        pick = max(range(len(lls)), key=lambda i: lls[i])
        pick_norm = max(range(len(lls)), key=lambda i: lls[i] / max(item.lengths[i], 1))
        acc += item.credit[pick]
        acc_norm += item.credit[pick_norm]
        per_item.append({"where": item.where, "loglikelihoods": lls, "pick": pick, "pick_norm": pick_norm})
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n}, per_item, truncated


def _cloze(model, tokenizer, task, items, k, batch_size):
    pairs, truncated = _pairs(tokenizer, model, items, [[(task.prompt(item, k), item.targets[0])] for item in items])
    results = loglikelihoods(model, pairs, batch_size)
    tokens = sum(len(continuation) for _, continuation in pairs)
    per_item = [{"where": item.where, "loglikelihood": ll, "greedy": greedy}
                for item, (ll, greedy) in zip(items, results)]
    acc = sum(greedy for _, greedy in results) / max(len(items), 1)
    ppl = math.exp(min(-sum(ll for ll, _ in results) / max(len(items), 1), 50.0))
    return {"acc": acc, "ppl": ppl, "target_tokens": tokens}, per_item, truncated


def answer_of(text: str, stop: list[str], output_regex: str | None = None) -> str:
    """The generated answer: cut before the first stop string, then (BIG-bench) the first match of the regex."""
    for s in stop:
        text = text.split(s, 1)[0]
    if output_regex:
        found = re.findall(output_regex, text)
        text = found[0] if found else ""
        text = text if isinstance(text, str) else text[0]
    return text


def _generate(model, tokenizer, task, items, k, batch_size):
    if task.metric == "code":
        from commonlm.evaluate.code import humaneval_check

        check = humaneval_check(task.code_timeout)  # (refuses without a time limit, before generating anything)
    else:
        check = CHECKERS[task.metric]
    max_len = model.config.max_seq_len
    new_tokens = max(1, min(task.max_tokens, max_len // 2))
    stop_ids = set(tokenizer.stop_ids)
    for s in task.stop:  # a stop string that is one token ends decoding there (the text is cut at it anyway)
        ids = tokenizer.encode(s)
        if len(ids) == 1:
            stop_ids.add(ids[0])
    requests, truncated = [], 0
    for item in items:
        prompt = task.prompt(item, k)
        ids = tokenizer.encode(prompt)
        check_encodable(tokenizer, prompt, ids, item.where)
        if not ids:
            ids = [tokenizer.eot_id]
        truncated += len(ids) > max_len - new_tokens
        requests.append(Request(prompt_ids=ids[-(max_len - new_tokens):], max_tokens=new_tokens, temperature=0.0,
                                stop_ids=tuple(sorted(stop_ids))))
    engine = Engine(model, max_batch=max(1, min(batch_size, len(requests))), max_len=max_len)
    seqs = engine.run_all(requests)
    right, per_item = 0.0, []
    for item, seq in zip(items, seqs):
        answer = answer_of(tokenizer.decode(seq.generated), task.stop, task.output_regex)
        score = max(check(answer, target, item.context) for target in item.targets)  # (completion, answer, prompt)
        right += score
        per_item.append({"where": item.where, "answer": answer, "score": score})
    return {"acc": right / max(len(items), 1)}, per_item, truncated


def score_tasks(model: torch.nn.Module, tokenizer: Tokenizer, tasks: list[Task], few_shot: int | None = None,
                limit: int | None = None, batch_size: int = 16) -> list[TaskResult]:
    """Every task; a family of subtasks (BIG-bench's) shares `limit` among its subtasks and gets a row of its own,
    the mean of theirs."""
    families: dict[str, list[Task]] = {}
    for task in tasks:
        if task.family:
            families.setdefault(task.family, []).append(task)
    results = []
    for task in tasks:
        share = limit
        if limit and task.family:
            share = max(1, math.ceil(limit / len(families[task.family])))
        results.append(score_task(model, tokenizer, task, few_shot, share, batch_size))
        family = families.get(task.family or "")
        if family and task is family[-1]:
            results.append(_mean_of(task.family, [r for r in results if r.family == task.family]))
    return results


def _mean_of(name: str, parts: list[TaskResult]) -> TaskResult:
    keys = [k for k in parts[0].metrics if all(k in p.metrics for p in parts)]
    metrics = {k: sum(p.metrics[k] for p in parts) / len(parts) for k in keys}
    return TaskResult(f"{name} (mean of {len(parts)})", parts[0].kind, sum(p.items for p in parts), metrics,
                      sum(p.chance for p in parts) / len(parts), sum(p.truncated for p in parts),
                      sum(p.seconds for p in parts))


def table(results: list[TaskResult]) -> str:
    """The results as a plain-text table, chance level beside every score."""
    lines = [f"{'task':<44} {'items':>6} {'acc':>7} {'acc_norm':>8} {'chance':>7} {'items/s':>8}"]
    for r in results:
        norm = f"{r.metrics['acc_norm']:.4f}" if "acc_norm" in r.metrics else "-"
        rate = r.items / r.seconds if r.seconds else 0.0
        lines.append(f"{r.name:<44} {r.items:>6} {r.metrics['acc']:>7.4f} {norm:>8} {r.chance:>7.4f} {rate:>8.1f}")
    return "\n".join(lines)
