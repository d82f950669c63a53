"""The batched inference engine: continuous batching over a slot KV cache, on one thread (`run` on the
caller's, or `start` for a new one; `commonlm serve` runs it on its main thread, see serve/app.py).

Requests join and leave between decode steps. Each step (1) gives waiting requests free slots,
(2) prefills prompts in chunks of at most `prefill_chunk` tokens in all (so a long prompt never stalls
the running requests for more than one chunk), and (3) decodes one token for every running request
in a single batched forward pass. Sampling is per request (temperature, top-k, top-p, seed, and the
OpenAI repetition/frequency/presence penalties). Tokens go to each request's `on_token` callback as
they are made; stop strings and text are the caller's business (see serve/), stop ids the engine's.

    engine = Engine(model, max_batch=16); engine.start()
    handle = engine.submit(Request(prompt_ids=[...], max_tokens=50), on_token=print)
    handle.wait()
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from commonlm.infer.generate import sample_next
from commonlm.kernels import use_matvec
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import SlotKVCache


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL / HF style)
    frequency_penalty: float = 0.0  # OpenAI: logit -= penalty * times the token was generated
    presence_penalty: float = 0.0  # OpenAI: logit -= penalty if the token was generated at all


@dataclass
class Sequence:
    """A request in flight: its slot, how much of the prompt is in the cache, what it generated."""

    request: Request
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    slot: int = -1
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_id: int | None = None  # the stop id that ended it (finish_reason "stop"); not in `generated`
    cancelled: bool = False
    generator: torch.Generator | None = None
    done: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def cancel(self) -> None:
        """Stop generating (a client went away, or a stop string was seen); the slot is freed next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class EngineStats:
    """Counters for /metrics; written by the thread that runs the engine, read by anybody."""

    def __init__(self) -> None:
        self.requests_finished = collections.Counter()  # by finish reason
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.last_batch_size = 0
        self.batch_sizes = collections.Counter()


class Engine:
    def __init__(
        self,
        model: Decoder,
        max_batch: int = 16,
        max_len: int | None = None,
        prefill_chunk: int = 256,
        dtype: torch.dtype | None = None,
    ):
        self.model = use_matvec(model.eval())  # a batch of one in bf16 on CPU: torch.mv (commonlm/kernels.py)
        self.device = model.embed.weight.device
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_cache(max_batch, self.max_len, dtype=dtype, kind=SlotKVCache)
        self.free_slots = list(range(max_batch))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.lock = threading.Condition()
        self.stats = EngineStats()
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- the public side ------------------------------------------------------------------------------
    def submit(
        self,
        request: Request,
        on_token: Callable[[int], None] = lambda t: None,
        on_finish: Callable[[str], None] = lambda reason: None,
    ) -> Sequence:
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        if len(request.prompt_ids) >= self.max_len:
            n = len(request.prompt_ids)
            raise ValueError(f"prompt of {n} tokens leaves no room in a context of {self.max_len}")
        seq = Sequence(request, on_token, on_finish)
        if request.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        with self.lock:
            self.waiting.append(seq)
            self.lock.notify()
        return seq

    @property
    def queue_depth(self) -> int:
        return self.queued()

    def queued(self, extra: int = 0) -> int:
        """Requests that wait for a slot: those the free slots cannot take at the next step (with `extra` more
        submitted). Requests whose client went away do not count."""
        with self.lock:
            waiting = sum(1 for seq in self.waiting if not seq.cancelled) + extra
            return max(0, waiting - len(self.free_slots))

    @property
    def active(self) -> int:
        return len(self.running)

    def start(self) -> Engine:
        """Decode on a new thread (tests, notebooks). Slower where another thread of this process already ran
        PyTorch ops (a second OpenMP pool, see serve/app.py:serve): `commonlm serve` calls `run` instead."""
        self._thread = threading.Thread(target=self.run, name="commonlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Decode on the calling thread until `stop()` or until `keep_going()` turns false (checked at least
        twice a second while idle)."""
        while keep_going():
            with self.lock:
                if self._stop:
                    return
                if not self.waiting and not self.running:
                    self.lock.wait(timeout=0.5)
                    continue
            try:
                self.step()
            except Exception as e:  # a bug must not stop the engine: fail what was running, keep serving
                self._fail_running(e)

    def run_all(self, requests: list[Request], between: Callable[[], object] | None = None) -> list[Sequence]:
        """Submit `requests` and decode on the calling thread until every one has finished, for an engine that
        nobody else feeds (GRPO's rollouts, tune/grpo.py; evaluation): their ids are in `.generated`. Errors
        propagate. `between`: called after every step (evaluation's thread governor)."""
        seqs = [self.submit(request) for request in requests]
        while self.waiting or self.running:
            self.step()
            if between is not None:
                between()
        return seqs

    # -- one step -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        self._drop_cancelled()
        budget = self.prefill_chunk
        done: dict[tuple[int, ...], tuple[Sequence, torch.Tensor]] = {}  # prompts whose prefill ended this step
        for seq in [s for s in self.running if s.prefilled < len(s.request.prompt_ids)]:
            prompt = tuple(seq.request.prompt_ids)
            if seq.prefilled == 0 and prompt in done:  # the same prompt (n samples of it): copy, compute nothing
                self._share_prompt(*done[prompt], seq)
            elif budget > 0:
                used, last = self._prefill(seq, budget)
                budget -= used
                if last is not None:
                    done[prompt] = (seq, last)
        decoding = [s for s in self.running if s.prefilled == len(s.request.prompt_ids) and s.finish_reason is None
                    and s.generated]
        if decoding:
            self._decode(decoding)
        self._retire()

    def _fail_running(self, error: Exception) -> None:
        import traceback

        traceback.print_exception(error)
        for seq in self.running:
            seq.finish_reason = seq.finish_reason or "error"
        self._retire()

    def _admit(self) -> None:
        with self.lock:
            if any(seq.cancelled for seq in self.waiting):  # abandoned while queued: gone before taking a slot
                for seq in [s for s in self.waiting if s.cancelled]:
                    self._finish(seq, "cancelled")
                self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
            while self.waiting and self.free_slots:
                seq = self.waiting.popleft()
                seq.slot = self.free_slots.pop(0)
                self.cache.free(seq.slot)
                self.running.append(seq)
                self.stats.prompt_tokens += len(seq.request.prompt_ids)

    def _drop_cancelled(self) -> None:
        for seq in self.running:
            if seq.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
        self._retire()

    def _prefill(self, seq: Sequence, budget: int) -> tuple[int, torch.Tensor | None]:
        """Prefill the next chunk of `seq`'s prompt: (tokens computed, the last position's logits once the
        prompt is done, else None)."""
        prompt = seq.request.prompt_ids
        chunk = prompt[seq.prefilled : seq.prefilled + budget]
        self.cache.select([seq.slot])
        logits, _ = self.model(torch.tensor([chunk], device=self.device), cache=self.cache, last_only=True)
        seq.prefilled += len(chunk)
        if seq.prefilled < len(prompt):
            return len(chunk), None
        self._emit([seq], logits[:, -1, :])
        return len(chunk), logits[:, -1, :]

    def _share_prompt(self, source: Sequence, last: torch.Tensor, seq: Sequence) -> None:
        """Give `seq` the cache of `source`'s identical prompt, prefilled this step (no token of its own is in
        the cache yet), and its first token from the same logits: what its own prefill would have computed,
        without the compute (GRPO samples a group of completions of each prompt, tune/grpo.py)."""
        n = len(seq.request.prompt_ids)
        cache = self.cache
        cache.k[:, seq.slot, :n] = cache.k[:, source.slot, :n]
        cache.v[:, seq.slot, :n] = cache.v[:, source.slot, :n]
        cache.lengths[seq.slot] = n
        seq.prefilled = n
        self._emit([seq], last)

    def _decode(self, batch: list[Sequence]) -> None:
        self.cache.select([s.slot for s in batch])
        idx = torch.tensor([[s.generated[-1]] for s in batch], device=self.device)
        logits, _ = self.model(idx, cache=self.cache, last_only=True)
        self.stats.steps += 1
        self.stats.last_batch_size = len(batch)
        self.stats.batch_sizes[len(batch)] += 1
        self._emit(batch, logits[:, -1, :])

    def _emit(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        # greedy rows without penalties in one reduction over the batch (one per row cost ~60 us each)
        greedy = [i for i, seq in enumerate(batch) if seq.request.temperature <= 0 and not has_penalties(seq.request)]
        picked = {}
        if greedy:
            rows = logits if len(greedy) == len(batch) else logits[greedy]
            picked = dict(zip(greedy, rows.max(dim=-1).indices.tolist()))
        for row, seq in enumerate(batch):
            r = seq.request
            token = picked.get(row)
            if token is None:
                row_logits = apply_penalties(logits[row].float(), r, seq.generated)
                token = int(sample_next(row_logits[None], r.temperature, r.top_k, r.top_p, seq.generator))
            if seq.first_token_at is None:
                seq.first_token_at = time.perf_counter()
            if token in r.stop_ids:
                seq.finish_reason, seq.stop_id = "stop", token
                continue
            seq.generated.append(token)
            self.stats.generated_tokens += 1
            seq.on_token(token)
            if len(seq.generated) >= r.max_tokens or int(self.cache.lengths[seq.slot]) >= self.max_len:
                seq.finish_reason = "length"

    def _retire(self) -> None:
        keep = []
        for seq in self.running:
            if seq.finish_reason is None and not seq.cancelled:
                keep.append(seq)
                continue
            self.cache.free(seq.slot)
            with self.lock:
                self.free_slots.append(seq.slot)
                self.free_slots.sort()
            self._finish(seq, seq.finish_reason or "cancelled")
        self.running = keep

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.stats.requests_finished[reason] += 1
        try:
            seq.on_finish(reason)
        finally:
            seq.done.set()


def has_penalties(r: Request) -> bool:
    return r.repetition_penalty != 1.0 or bool(r.frequency_penalty) or bool(r.presence_penalty)


def apply_penalties(logits: torch.Tensor, r: Request, generated: list[int]) -> torch.Tensor:
    """logits [V] with repetition (prompt + output), frequency and presence (output) penalties applied."""
    if not has_penalties(r):
        return logits
    logits = logits.clone()
    if r.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(generated)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / r.repetition_penalty, values * r.repetition_penalty)
    if generated and (r.frequency_penalty or r.presence_penalty):
        ids = torch.tensor(generated, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.numel()).to(logits.dtype)
        logits -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(logits.dtype)
    return logits
