"""Sampling with a KV cache: the single-request path (the CLI, the Python API, evaluation samples).

`sample_next` is the per-step sampler (temperature, top-k, top-p) shared with the batched engine;
`stream_ids` yields token ids one at a time; `stream_text` turns them into text pieces that are
safe to print (no half UTF-8 characters, no control tokens) and stops at stop strings without printing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.kernels import use_matvec
from commonlm.model.decoder import Decoder


@dataclass
class SamplingParams:
    """What to sample. Checked when made, so the CLI and the Python API refuse the same bad values with
    the same one-line UserError (a negative top_k reached torch.topk; a negative temperature was greedy)."""

    max_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature >= 0,
             "must be >= 0 (0: greedy)"),
            ("top_k", self.top_k, self.top_k >= 0, "must be >= 0 (0: off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1] (1: off)"),
        ]  # fmt: skip
        for name, value, ok, why in checks:
            if not ok:
                raise UserError(f"sampling: {name}={value!r} (--{name.replace('_', '-')}) {why}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next ids [B]."""
    if temperature <= 0:
        return logits.max(dim=-1).indices  # the first of equal maxima, like argmax, 4x faster on CPU bf16
    # extreme settings (a tiny temperature or repetition penalty) can overflow: keep the order, drop the infs
    logits = torch.nan_to_num(logits.float() / temperature, nan=-3e38, posinf=3e38, neginf=-3e38)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        drop[..., 0] = False  # and always the most likely token (rounding must not empty the set)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_ids(
    model: Decoder,
    prompt_ids: list[int],
    max_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    compile: bool = False,
) -> Iterator[int]:
    """Yield up to `max_tokens` new ids (fewer at a stop id or when the context is full).

    `compile=True` decodes through a compiled step (infer/compiled.py): the first call of a process
    spends seconds compiling, later tokens come faster.
    """
    use_matvec(model.eval())  # one-row steps in bf16 on CPU: torch.mv (commonlm/kernels.py)
    device = model.embed.weight.device
    limit = model.config.max_seq_len
    if not prompt_ids:
        raise ValueError("empty prompt")
    prompt_ids = prompt_ids[-(limit - 1) :]  # keep the most recent context if the prompt is too long
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    room = min(limit, len(prompt_ids) + max_tokens)
    if compile:
        from commonlm.infer.compiled import compiled_decode_step, static_cache_length
        from commonlm.model.kv_cache import StaticKVCache

        decode_step = compiled_decode_step(model)
        cache = model.new_cache(1, static_cache_length(room, limit), kind=StaticKVCache)
    else:
        cache = model.new_cache(1, room)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    length = 0  # positions in the cache
    for _ in range(max_tokens):
        if compile and length > 0:
            logits = decode_step(idx, cache)
        else:
            logits = model(idx, cache=cache, last_only=True)[0][:, -1, :]
        length += idx.shape[1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        token = int(nxt.item())
        yield token
        if token in stop_ids or length >= room:
            return
        idx = nxt.view(1, 1)


def generate_ids(model: Decoder, prompt_ids: list[int], **kwargs) -> list[int]:
    return list(stream_ids(model, prompt_ids, **kwargs))


class TextStream:
    """Token ids in, printable text out. Holds back a half-decoded UTF-8 character and any tail that
    could be the start of a stop string; once a stop string appears, `stopped` is set and the text
    ends right before it. Shared by `stream_text` and the server."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded continuation already handed out
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=0) - 1

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        return self._take(text, final=False)

    def finish(self) -> str:
        """The held-back rest, once no more tokens will come."""
        return "" if self.stopped else self._take(self._decode(), final=True)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special=True)  # control tokens never show as text

    def _take(self, text: str, final: bool) -> str:
        hits = [h for h in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if h >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(text) if final else len(text) - max(0, self._hold)
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : end], end
        return piece


def start_id(tokenizer: Tokenizer) -> int:
    """The token an empty prompt stands for: the tokenizer's beginning-of-text token where it has one, else
    end-of-text, which precedes every document in our training streams (so what follows starts a document)."""
    bos = tokenizer.token_id(tokenizer.bos_token) if tokenizer.bos_token else None
    return bos if bos is not None else tokenizer.eot_id


def stream_text(
    model: Decoder, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams, compile: bool = False
) -> Iterator[str]:
    """Yield printable text pieces of the continuation of `prompt`, stopping before any stop string.

    A text prompt is plain text: '<|endoftext|>' in it is those characters, not the control token. Give
    token ids (`Tokenizer.encode(text, allow_special=True)`, `Tokenizer.encode_chat`) for anything else."""
    stop_ids = tokenizer.stop_ids
    text = TextStream(tokenizer, params.stop)
    prompt_ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
    if not prompt_ids:  # an empty prompt: a text from its very beginning
        prompt_ids = [start_id(tokenizer)]
    token_stream = stream_ids(
        model, prompt_ids, max_tokens=params.max_tokens, temperature=params.temperature,
        top_k=params.top_k, top_p=params.top_p, seed=params.seed, stop_ids=stop_ids, compile=compile,
    )
    for token in token_stream:
        if token in stop_ids:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


def generate_text(model: Decoder, tokenizer: Tokenizer, prompt: str | list[int],
                  params: SamplingParams | None = None) -> str:
    return "".join(stream_text(model, tokenizer, prompt, params or SamplingParams()))
