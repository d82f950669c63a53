"""KV-cache bytes per token and decode speed: multi-head, grouped-query and latent attention at the same width.

    .venv/bin/python bench/kv_bytes.py                      # small models: bytes and decode; DeepSeek-V3's size: bytes
    .venv/bin/python bench/kv_bytes.py --batch 4 --prompt 512 --new 32

Bytes are read off the cache tensors the decoder allocates for each model (`Decoder.new_cache`, the engine's
`SlotKVCache`: keys + values over rows x positions), not computed from a formula: per token and layer, and for the
whole model. The DeepSeek-V3-size rows are built on the meta device (shapes only, no memory; their MLPs left dense,
which the cache does not depend on). Decode: the batched engine (`Engine.run_all`, the serving path) on seeded
random weights, `--batch` requests of a `--prompt`-token prompt each, greedy; decode tokens/s = the extra tokens
over the extra time of a run to `--new` tokens against a run to 1 token (so prefill is out), the median of
`--repeats` rounds, each round timing every model in turn (so a change in this shared host's load falls on all).
Ratios are against multi-head attention of the same run. Latent attention decodes absorbed (model/mla.py: each head's
query taken into the latent's space, attending over the cache entries as they lie); the row "up-projected" turns that
off (`LatentAttention.absorb = False`): every step up-projects the whole cached latent to every head's keys
and values, work that grows with the context.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import load_average, machine, markdown_table, median, setup_threads  # noqa: E402

from commonlm.config import ModelConfig  # noqa: E402
from commonlm.infer.engine import Engine, Request  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.model.kv_cache import SlotKVCache  # noqa: E402


def variants(base: ModelConfig, groups: int, rank: int, rope: int) -> dict[str, ModelConfig]:
    """Multi-head, grouped-query (n_head / groups key-value heads) and latent attention (a latent of `rank`, a shared
    rotary key of `rope`, each head's query/key and value as wide as the others' heads) at the width of `base`."""
    head = base.dim_head
    return {
        "MHA": base,
        f"GQA {base.n_head}/{base.n_head // groups}": dataclasses.replace(base, n_kv_head=base.n_head // groups),
        f"MLA {rank}+{rope}": dataclasses.replace(base, family="deepseek_v3", head_dim=0, kv_lora_rank=rank,
                                                  qk_nope_head_dim=head, qk_rope_head_dim=rope, v_head_dim=head),
    }


def cache_bytes(model: Decoder, dtype: torch.dtype, rows: int = 2, positions: int = 8) -> tuple[float, str]:
    """(bytes per token of the whole model, what one token and layer keeps) from an allocated SlotKVCache."""
    cache = model.new_cache(rows, positions, dtype=dtype, kind=SlotKVCache)
    nbytes = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    (k_heads, k_dim), (v_heads, v_dim) = cache.k.shape[-2:], cache.v.shape[-2:]
    return nbytes / (rows * positions), f"{k_heads}x{k_dim} + {v_heads}x{v_dim}"


def decode_timer(model: Decoder, batch: int, prompt: int, new: int) -> Callable[[], float]:
    """A function timing one round: decode tokens/s of `batch` requests from the extra time of `new` tokens over 1."""
    engine = Engine(model, max_batch=batch, max_len=prompt + new)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt,), generator=g).tolist() for _ in range(batch)]

    def run(n: int) -> float:
        t0 = time.perf_counter()
        engine.run_all([Request(prompt_ids=p, max_tokens=n, temperature=0.0, stop_ids=()) for p in prompts])
        return time.perf_counter() - t0

    run(2)  # warm-up
    return lambda: batch * (new - 1) / (run(new) - run(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="requests decoding together")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens of each request")
    ap.add_argument("--new", type=int, default=32, help="new tokens of each request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    args = ap.parse_args()
    setup_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"# kv_bytes · {machine()} · load {load_average()}\n")

    small = ModelConfig(family="llama", vocab_size=4096, n_layer=4, n_head=8, d_model=512, max_seq_len=1024,
                        tie_embeddings=False)
    runs = [(name, config, True) for name, config in variants(small, groups=4, rank=256, rope=32).items()]
    runs.append((runs[-1][0] + ", up-projected", runs[-1][1], False))
    models, timers = [], []
    for _, config, absorb in runs:
        torch.manual_seed(0)
        model = Decoder(config).to(dtype).eval()
        for block in model.blocks:
            block.attn.absorb = absorb  # (read by latent attention only)
        models.append(model)
        timers.append(decode_timer(model, args.batch, args.prompt, args.new))
    speeds = [median(round_) for round_ in zip(*[[timer() for timer in timers] for _ in range(args.repeats)])]
    rows, base_bytes = [], None
    for (name, config, _), model, speed in zip(runs, models, speeds):
        per_token, shape = cache_bytes(model, dtype)
        base_bytes = base_bytes or per_token
        rows.append([name, shape, f"{per_token / config.n_layer:,.0f}", f"{per_token:,.0f}",
                     f"{per_token / base_bytes:.3f}x", f"{model.num_params() / 1e6:.1f}M", f"{speed:,.0f}",
                     f"{speed / speeds[0]:.2f}x"])
    print(f"small models: d_model 512, 8 heads of 64, 4 layers, vocab 4096, {args.dtype}; decode: {args.batch} "
          f"requests x ({args.prompt} prompt + {args.new} new) tokens through the engine\n")
    print(markdown_table(["attention", "cache per token and layer (heads x dim, k + v)", "bytes/token/layer",
                          "bytes/token (model)", "vs MHA", "params", "decode tok/s", "vs MHA"], rows))

    # DeepSeek-V3's size: 61 layers, d_model 7168, 128 heads of 128 (+ 64 rotary for its latent attention)
    big = ModelConfig(family="llama", vocab_size=129280, n_layer=61, n_head=128, d_model=7168, head_dim=128,
                      d_ff=64, max_seq_len=4096, tie_embeddings=False)
    rows, base_bytes = [], None
    for name, config in variants(big, groups=16, rank=512, rope=64).items():
        with torch.device("meta"):
            model = Decoder(config)
        per_token, shape = cache_bytes(model, torch.bfloat16)
        base_bytes = base_bytes or per_token
        rows.append([name, shape, f"{per_token / config.n_layer:,.0f}", f"{per_token:,.0f}",
                     f"{per_token / base_bytes:.4f}x", f"{per_token * 128 * 1024 / 2**30:,.1f} GiB"])
    print("\nDeepSeek-V3's size (61 layers, d_model 7168, 128 heads of 128), bf16, cache tensors allocated on the "
          "meta device\n")
    print(markdown_table(["attention", "cache per token and layer", "bytes/token/layer", "bytes/token (model)",
                          "vs MHA", "one 128k-token context"], rows))
    print(f"\nload {load_average()}")


if __name__ == "__main__":
    main()
