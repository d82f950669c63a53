"""Training throughput (tokens/s, MFU) of our real training step, against a plain-PyTorch baseline.

    .venv/bin/python bench/train_throughput.py                     # tiny, nanogpt-cpu, gpt2-small
    .venv/bin/python bench/train_throughput.py --presets nanogpt-cpu --rounds 5 --compile

One step is what `commonlm.train.trainer` does for one micro-batch: set the scheduled lr, forward under
`commonlm.runtime.autocast` (bf16 where the device supports it), backward, clip the gradient norm, fused
AdamW from `make_optimizer`, zero the gradients. Tokens are random (throughput does not depend on them).
MFU = model FLOPs (`Decoder.flops_per_token`: 6 x matmul weights + attention) per second over the matmul
peak measured in this run (`measure_peak_flops`) in the same dtype; on a GPU whose data-sheet bf16 peak we know
(`metrics.RATED_BF16_PEAK`), also over that, the figure other projects quote.

The baseline is a minimal plain-PyTorch GPT written below, the way nanoGPT trains on CPU: fp32 eager,
LayerNorm, fused qkv, SDPA causal, GELU MLP, tied head, no biases, AdamW (not fused, as nanoGPT on CPU)
with grad clipping, at nanoGPT's CPU shape (4 layers, 4 heads, width 128, context 64, batch 12, vocab 65).
On a noisy machine the two are timed in alternating rounds, and each row's figure is the median over all
its timed steps. Published reference on this machine: nanoGPT's own train.py, 31.2 ms/iter (24.6k tok/s).

On CPU, gpt2-small runs with micro batch 1 at context 1024 and only a few steps (one step takes seconds).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import human, load_average, machine, markdown_table, median, setup_threads, time_steps  # noqa: E402

from commonlm.config import RunConfig, load_config  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.model.loss import lm_loss  # noqa: E402
from commonlm.runtime import autocast, pick_device, pick_dtype  # noqa: E402
from commonlm.train.metrics import measure_peak_flops, rated_peak_flops  # noqa: E402
from commonlm.train.optim import lr_at, make_optimizer  # noqa: E402
from commonlm.train.trainer import resolve_vocab  # noqa: E402

# nanoGPT (karpathy/nanoGPT @ 3adf61e) train.py at its shakespeare_char CPU config, fp32 eager: 31.2 ms/iter
# (median) at 12 x 64 tokens, measured outside this repository on a 2-vCPU AMD EPYC (Zen 5) of this sandbox
NANOGPT_REFERENCE_TOK_S = 24.6e3
NANOGPT_SHAPE = dict(n_layer=4, n_head=4, d_model=128, seq_len=64, batch=12, vocab=65)


# -- the baseline: a minimal plain-PyTorch GPT at the nanoGPT CPU shape ---------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class BaselineGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, n_layer: int, n_head: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.h = nn.ModuleList(_Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def flops_per_token(self, seq_len: int) -> float:  # same accounting as Decoder.flops_per_token
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        d, n_layer = self.ln_f.weight.numel(), len(self.h)
        return 6 * matmul + 12 * n_layer * d * seq_len


def baseline_step(device: torch.device):
    s = NANOGPT_SHAPE
    torch.manual_seed(0)
    model = BaselineGPT(s["vocab"], s["seq_len"], s["d_model"], s["n_layer"], s["n_head"]).to(device)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=device.type == "cuda")

    def step() -> None:
        x = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), device=device)
        y = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), device=device)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    n_params = sum(p.numel() for p in model.parameters())
    return step, n_params, model.flops_per_token(s["seq_len"])


# -- ours: the trainer's step ----------------------------------------------------------------------------
def preset_config(name: str, device: torch.device) -> tuple[RunConfig, int, int]:
    """The preset, its vocabulary, and the (micro batch, context) benchmarked on this device."""
    config = load_config(name)
    if name == "nanogpt-cpu":
        config.model.vocab_size = NANOGPT_SHAPE["vocab"]  # nanoGPT's character vocabulary, exactly
    elif config.model.family == "gpt2" and name.startswith("gpt2"):
        config.model.vocab_size = 64 * math.ceil(50257 / 64)  # GPT-2's tokenizer, padded as resolve_vocab does
    else:
        resolve_vocab(config, Tokenizer.byte_level())
    seq = config.train.seq_len or config.model.max_seq_len
    batch = config.train.micro_batch_size
    if device.type == "cpu" and seq * batch > 4096:  # gpt2-small on CPU: one sequence per step
        batch = 1
    return config, batch, seq


def our_step(config: RunConfig, batch: int, seq: int, device: torch.device, dtype: torch.dtype, compile: bool):
    torch.manual_seed(config.train.seed)
    model = Decoder(config.model).to(device)
    opt = make_optimizer(model, config.train, device)
    run = torch.compile(model) if compile else model
    cfg, vocab = config.train, config.model.vocab_size
    state = {"step": 0}

    def step() -> None:
        lr = lr_at(state["step"], cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.randint(0, vocab, (batch, seq), device=device)
        y = torch.randint(0, vocab, (batch, seq), device=device)
        with autocast(device, dtype):
            loss = lm_loss(run(x)[0], y)
        loss.backward()
        loss.detach().item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step, model.num_params(), model.flops_per_token(seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,nanogpt-cpu,gpt2-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per row")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (small presets)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each round")
    ap.add_argument("--fp32-too", action=argparse.BooleanOptionalAction, default=True,
                    help="also time nanogpt-cpu in fp32 (like for like with the fp32 baseline)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time nanogpt-cpu with train.compile=true (torch.compile; ~20-30 s to compile cold)")
    ap.add_argument("--heavy-steps", type=int, default=2, help="timed steps for gpt2-small-sized models on CPU")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    threads = setup_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    dtypes = sorted({dtype, torch.float32}, key=str)
    peaks = {dt: measure_peak_flops(device, dt) for dt in dtypes}
    rated = rated_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    print(f"# train_throughput · {machine()} · device {device} · load {load_average()}")

    # rows: (label, dtype, make-step, batch, seq, heavy)
    rows = []
    s = NANOGPT_SHAPE
    if device.type == "cpu":
        rows.append(("baseline (plain PyTorch, fp32 eager)", torch.float32, lambda: baseline_step(device),
                     s["batch"], s["seq_len"], False))
    for name in args.presets.split(","):
        config, batch, seq = preset_config(name, device)
        heavy = device.type == "cpu" and config.model.d_model >= 768
        variants = [(dtype, False)]
        if name == "nanogpt-cpu" and args.fp32_too and dtype != torch.float32:
            variants.append((torch.float32, False))
        if name == "nanogpt-cpu" and args.compile:
            variants.append((dtype, True))
        for dt, comp in variants:
            label = name + (" + compile" if comp else "")
            make = (lambda c=config, b=batch, q=seq, d=dt, k=comp: our_step(c, b, q, device, d, k))
            rows.append((label, dt, make, batch, seq, heavy))

    built = [r[2]() for r in rows]  # (step, params, flops/token)
    times: list[list[float]] = [[] for _ in rows]
    for r in range(args.rounds):  # alternate rows so that load changes hit all of them alike
        for i, row in enumerate(rows):
            heavy = row[5]
            if heavy and r == 0:  # seconds per step: one warm-up step and a few timed ones, once
                times[i] += time_steps(built[i][0], 1, args.heavy_steps, device)
            elif not heavy:
                times[i] += time_steps(built[i][0], args.warmup, args.steps, device)
        print(f"round {r + 1}/{args.rounds} · load {load_average()}", file=sys.stderr)
    for dt in dtypes:  # the peak again: a busy machine lowers it, and MFU should not flatter us
        peaks[dt] = max(peaks[dt], measure_peak_flops(device, dt))

    base_tok_s = None
    table, ours = [], {}
    for i, (label, dt, _, batch, seq, heavy) in enumerate(rows):
        _, n_params, flops_tok = built[i]
        ms = 1e3 * median(times[i])
        tok_s = batch * seq / (ms / 1e3)
        mfu = tok_s * flops_tok / peaks[dt]
        if label.startswith("baseline"):
            base_tok_s = tok_s
        elif label.startswith("nanogpt-cpu"):
            ours[f"{label} ({dname[dt]})"] = tok_s
        same_shape = label.startswith(("baseline", "nanogpt-cpu"))
        ratio = f"{tok_s / base_tok_s:.2f}x" if same_shape and base_tok_s else "–"
        context = f"{seq}" + (" (short run)" if heavy else "")
        table.append([label, human(n_params), f"{batch}×{context}", dname[dt], f"{ms:.1f}", f"{tok_s / 1e3:.1f}k",
                      f"{100 * mfu:.1f}%", ratio])
        if rated:  # against the data sheet too, as other projects quote MFU (bf16 rows only)
            table[-1].insert(-1, f"{100 * tok_s * flops_tok / rated:.1f}%" if dt == torch.bfloat16 else "–")
    header = ["preset", "params", "batch×context", "dtype", "ms/step", "tokens/s", "MFU (measured peak)",
              *(["MFU (rated bf16 peak)"] if rated else []), "ratio vs baseline"]
    print()
    print(markdown_table(header, table))
    print()
    print("matmul peak (max of start and end of run): "
          + ", ".join(f"{dname[dt]} {human(p)}FLOP/s" for dt, p in peaks.items()))
    print(f"threads {threads} · {args.rounds} rounds · median over all timed steps · load {load_average()}")
    print(f"nanoGPT train.py at its CPU config: {NANOGPT_REFERENCE_TOK_S / 1e3:.1f}k tok/s (measured on the "
          "2-vCPU AMD EPYC Zen 5 of this sandbox; compare with care if this CPU differs) -> "
          + ", ".join(f"{k} {v / NANOGPT_REFERENCE_TOK_S:.2f}x" for k, v in ours.items()))

if __name__ == "__main__":
    main()
