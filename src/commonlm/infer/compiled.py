"""A compiled one-token decode step: `generate --compile` and `stream_ids(..., compile=True)`.

Decoding one token in eager mode spends about a fifth of its time outside the weight matmuls, in
small ops (norms, residual adds, the activation, cache writes) and the Python between them.
torch.compile fuses those into a few C++ (or Triton) loops. It needs fixed shapes to compile once,
hence `StaticKVCache` (model/kv_cache.py); the prompt's prefill still runs eagerly on the same cache.

Two choices make it pay off on CPU (measured in bench/decode.py):
- The matrix-vector products stay calls into PyTorch's own kernel (oneDNN): Inductor's default
  decompositions would turn `mv` into its own C++ loop, which reads bf16 weights ~1.4x slower here.
- `cpp_wrapper`: the compiled graph is driven from C++, not from Python.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable

import torch

from commonlm.errors import UserError
from commonlm.kernels import use_matvec
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import StaticKVCache

SHORTEST_CACHE = 256


def static_cache_length(needed: int, max_seq_len: int) -> int:
    """Cache lengths come in powers of two (from 256, at most max_seq_len): a handful of compiled graphs
    serve every request length, while short requests do not attend over the whole context."""
    length = SHORTEST_CACHE
    while length < needed:
        length *= 2
    return min(length, max_seq_len)


class _QuietProxyNotice(logging.Filter):
    """Inductor warns, once per call site, that `mv` has no C shim and goes through its proxy executor:
    that is how we want it (timed: no slower than `addmv`'s shim), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "c-shim implementation" not in record.getMessage()


logging.getLogger("torch._inductor.ir").addFilter(_QuietProxyNotice())


def _register_mv_fallbacks(keep: set) -> None:
    """Lower the kept ops as plain calls to their ATen kernels. Inductor would make these fallbacks
    itself, but it refuses to when the environment variable CI is set and a decomposition exists,
    so we register them explicitly (once; the registry is global)."""
    from torch._inductor.lowering import lowerings, make_fallback

    for op in keep:
        if op not in lowerings:
            make_fallback(op, warn=False, override_decomp=True)


def _inductor_keeping_mv(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    keep = {aten.mv.default, aten.addmv.default}
    _register_mv_fallbacks(keep)
    table = {op: fn for op, fn in select_decomp_table().items() if op not in keep}
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    return compile_fx(gm, example_inputs, decompositions=table, config_patches={"cpp_wrapper": on_cpu})


def _decode(model: Decoder, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    logits, _ = model(idx, cache=cache, last_only=True)
    return logits[:, -1]


_steps: weakref.WeakKeyDictionary[Decoder, tuple[tuple, Callable]] = weakref.WeakKeyDictionary()

DecodeStep = Callable[[torch.Tensor, StaticKVCache], torch.Tensor]


def _signature(model: Decoder) -> tuple:
    """What the compiled graph was built for: module types, tensor names, shapes, dtypes, devices."""
    modules = tuple((name, type(m)) for name, m in model.named_modules())
    tensors = tuple((n, t.shape, t.dtype, t.device) for n, t in model.state_dict(keep_vars=True).items())
    return modules + tensors


def compiled_decode_step(model: Decoder) -> DecodeStep:
    """`step(idx [B, 1], cache)` -> next-token logits [B, V], advancing the StaticKVCache.

    Each model gets its own compiled function, with its own backend object: a model seen for the first
    time is compiled anew even where its KV cache has another model's shapes (tests/infer/
    test_compiled.py). That lets the guards on the model's modules go (they cost ~0.3 ms per token
    here); what they would have caught, this model changed in place (quantized, cast, resized), is
    caught here instead by comparing `_signature`.
    """
    use_matvec(model)  # Inductor keeps the one-row matmuls as oneDNN's mv (see above)
    signature = _signature(model)
    entry = _steps.get(model)
    if entry is not None and entry[0] == signature:
        return entry[1]

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        return _inductor_keeping_mv(gm, example_inputs)

    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # (recent torch only)
    compiled = torch.compile(
        functools.partial(_decode, model), backend=backend, fullgraph=True, dynamic=False,
        options={"guard_filter_fn": skip_module_guards} if skip_module_guards else None,
    )

    def step(idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        try:
            return compiled(idx, cache)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on this machine
            reason = str(e).strip().splitlines()[0]
            raise UserError(f"compiling the decode step failed ({reason}); run without --compile, or install "
                            "a C++ compiler (g++) for torch.compile on CPU") from e

    _steps[model] = (signature, step)
    return step
