"""Scoring tasks (evaluate/tasks.py) on a model: batched log-likelihoods, and greedy answers from the one engine.

Log-likelihoods are computed as lm-evaluation-harness does, so numbers compare: the context and continuation
are encoded together and the continuation is the tail of that encoding past the context's own tokens
(whitespace at the end of the context moves to the continuation first, so " Paris" is scored as the word
with its space); an empty context starts from the end-of-text token; a pair longer than the model's context
loses its beginning. Each context is laid in a row once, its continuations after it, each seeing the context and
its own earlier tokens at the positions it would have right after the context (model/kv_cache.SharedPrefix): a
multiple-choice item costs one context and its choices, not a copy of the context per choice, and the numbers are
those of a row per pair. Layouts are sorted by length and packed into batches (the longest open the rows, the
shortest fill what is left of them), one forward pass per batch, and only the positions a continuation is
scored from are read: the head, over the whole vocabulary, runs on those positions alone. On CPU, the threads
follow the CPUs other processes leave free, looked at between forward passes and generation steps (threads.py's
governor, as training does; the count is put back at the end): on a 2-core machine shared with other work,
social_iqa scored 2.6x faster with 1 thread than with 2.

Multiple choice reports `acc` (the most likely choice is right) and `acc_norm` (log-likelihood divided by the
choice's length in characters, as the harness does); BIG-bench's partial credits count as they are. Cloze
reports `acc` (greedy decoding gives the target exactly: every continuation token is the argmax) and the
perplexity of the targets. Generation goes through infer/engine.py (greedy, batched, KV-cached), stops at the
model's stop ids, and is cut at the task's stop strings afterwards; checkers come from tune/rewards.py.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.tasks import Item, Task, limited
from commonlm.infer.engine import Engine, Request
from commonlm.model.kv_cache import SharedPrefix
from commonlm.threads import ThreadGovernor
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


@dataclass
class _Context:
    """One context laid once with its distinct continuations after it (model/kv_cache.SharedPrefix), and what each
    of its pairs reads: kept position 0 is the context's last token, then every continuation token in order."""

    tokens: list[int]  # the context, then each continuation but its last token
    branches: list[int]  # 0 on the context, k on the k-th continuation
    prefix: int  # the context's tokens
    reads: list[tuple[int, int, int]] = field(default_factory=list)  # (pair, kept position, the token it should be)

    @property
    def kept(self) -> int:
        return len(self.tokens) - self.prefix + 1


def _contexts(pairs: list[tuple[list[int], list[int]]], max_len: int) -> list[_Context]:
    """The pairs grouped by the tokens before their continuation (after cutting to the model's context), each group
    laid out once with its distinct continuations; one that would make the layout longer than the context starts
    another copy of it. Continuations that are the same but for their last token share a run (MMLU's letters: the
    context's last token alone)."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (context, continuation) in enumerate(pairs):
        ids = (context + continuation)[-(max_len + 1):]
        n = len(continuation)
        if len(ids) <= n:
            raise ValueError(f"pair {i}: {n} continuation tokens after {len(context)} of context leave nothing to "
                             f"predict the first from within max_seq_len={max_len}")
        groups.setdefault(tuple(ids[:-n]), {}).setdefault(tuple(ids[-n:]), []).append(i)
    laid: list[_Context] = []
    for prefix, continuations in groups.items():
        context, runs = None, {}
        for continuation, ids in continuations.items():
            tail = continuation[:-1]
            if context is None or (tail not in runs and len(context.tokens) + len(tail) > max_len):
                context, runs = _Context(list(prefix), [0] * len(prefix), len(prefix)), {(): 0}
                laid.append(context)
            if tail not in runs:
                runs[tail] = len(context.tokens) - context.prefix + 1
                context.branches += [len(runs) - 1] * len(tail)
                context.tokens += tail
            at = [0] + list(range(runs[tail], runs[tail] + len(tail)))
            context.reads += [(i, k, token) for i in ids for k, token in zip(at, continuation)]
    return laid


@torch.inference_mode()
def loglikelihoods(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]],
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding gives it) for each (context ids,
    continuation ids), in order. Pairs with the same context share one copy of it in a row, their continuations
    after it (`_contexts`); rows hold several short contexts side by side."""
    max_len = model.config.max_seq_len
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    totals = torch.zeros(len(pairs), dtype=torch.float64)
    misses = torch.zeros(len(pairs), dtype=torch.long)
    with _free_cpus(device) as look:
        for rows in _rows(_contexts(pairs, max_len), batch_size, vocab):
            _score_rows(model, rows, device, totals, misses)
            look()
    return [(total, miss == 0) for total, miss in zip(totals.tolist(), misses.tolist())]


@contextlib.contextmanager
def _free_cpus(device: torch.device) -> Iterator[Callable[[], object]]:
    """A look at the CPUs other processes leave free, to call between forward passes (on CPU: threads.py's
    governor sets torch's threads to them, at most every 2 s); torch's thread count is put back at the end."""
    threads = torch.get_num_threads()
    governor = ThreadGovernor(threads, every=2.0) if device.type == "cpu" else None
    try:
        yield governor.update if governor is not None else (lambda: None)
    finally:
        torch.set_num_threads(threads)


def _score_rows(model: torch.nn.Module, rows: list[list[_Context]], device: torch.device, totals: torch.Tensor,
                misses: torch.Tensor) -> None:
    """One forward pass over `rows`: add each read's log-probability to its pair's total, and count the reads
    where greedy decoding would pick another token."""
    width = max(sum(len(c.tokens) for c in row) for row in rows)
    kept = max(sum(c.kept for c in row) for row in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    items = torch.full((len(rows), width), -1, dtype=torch.long)
    branches = torch.zeros(len(rows), width, dtype=torch.long)
    keep = torch.zeros(len(rows), kept, dtype=torch.long)
    reads = []  # (pair, row, kept position, token)
    for r, row in enumerate(rows):
        at = k = 0
        for n, c in enumerate(row):
            end = at + len(c.tokens)
            x[r, at:end] = torch.tensor(c.tokens)
            items[r, at:end] = n
            branches[r, at:end] = torch.tensor(c.branches)
            keep[r, k : k + c.kept] = torch.arange(at + c.prefix - 1, end)
            reads += [(i, r, k + j, token) for i, j, token in c.reads]
            at, k = end, k + c.kept
    logits = _logits_at(model, x.to(device), SharedPrefix(items.to(device), branches.to(device)), keep.to(device))
    logp = logits.float().log_softmax(-1)
    pair, row, at, token = torch.tensor(reads, device=logp.device).T
    totals.index_add_(0, pair.cpu(), logp[row, at, token].double().cpu())
    misses.index_add_(0, pair.cpu(), (logp[row, at].argmax(-1) != token).long().cpu())


def _rows(contexts: list[_Context], batch_size: int, vocab: int):
    """Batches of rows, each row a list of contexts laid side by side: the longest contexts left open up to
    batch_size rows as wide as the first, each going into the first row with room for it, then the shortest left
    fill the gaps. The kept logits (rows x kept positions x vocabulary) stay within LOGITS_BUDGET."""
    order = collections.deque(sorted(contexts, key=lambda c: len(c.tokens), reverse=True))
    while order:
        width = len(order[0].tokens)
        rows: list[list[_Context]] = []
        while order and _place(rows, order[0], width, batch_size, vocab):
            order.popleft()
        while order and _place(rows, order[-1], width, 0, vocab):
            order.pop()
        yield rows


def _place(rows: list[list[_Context]], c: _Context, width: int, most_rows: int, vocab: int) -> bool:
    """Put `c` into the first of `rows` with room for it, else into a new row if there may be more than
    `most_rows`; whether it went in."""
    kept = [sum(other.kept for other in row) for row in rows]
    most = max([c.kept, *kept])
    for row, k in zip(rows, kept):
        fits = sum(len(other.tokens) for other in row) + len(c.tokens) <= width
        if fits and len(rows) * max(most, k + c.kept) * vocab <= LOGITS_BUDGET:
            row.append(c)
            return True
    if not rows or (len(rows) < most_rows and (len(rows) + 1) * most * vocab <= LOGITS_BUDGET):
        rows.append([c])
        return True
    return False


def _logits_at(model: torch.nn.Module, x: torch.Tensor, layout: SharedPrefix, keep: torch.Tensor) -> torch.Tensor:
    """The logits [B, K, V] of the inputs `x` [B, T] laid out as `layout` says, at positions `keep` [B, K] only: the
    head (and the vocabulary it spans) runs on those positions alone."""
    return model(x, cache=layout, keep=keep)[0]


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
            if not continuation_ids and text.strip():
                raise UserError(f"{item.where}: the choice or target {text!r} merges into the prompt's last token "
                                "(it is scored as the tokens of prompt + choice past the prompt's own, as "
                                "lm-evaluation-harness does), leaving nothing to score; put a delimiter between them")
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
        if not task.cut and len(ids) > max_len - new_tokens:
            raise UserError(f"{item.where}: the prompt is {len(ids)} tokens, and {new_tokens} more are generated: "
                            f"more than the model's context of {max_len}; evaluate a model with a longer context "
                            f"(or a shorter task)")
        truncated += len(ids) > max_len - new_tokens
        requests.append(Request(prompt_ids=ids[-(max_len - new_tokens):], max_tokens=new_tokens, temperature=0.0,
                                stop_ids=tuple(sorted(stop_ids))))
    engine = Engine(model, max_batch=max(1, min(batch_size, len(requests))), max_len=max_len)
    with _free_cpus(next(model.parameters()).device) as look:
        seqs = engine.run_all(requests, between=look)
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
