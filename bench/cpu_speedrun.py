"""CPU speedrun: wall time for a byte-level model to reach validation loss <= 1.88 on tinyshakespeare.

    .venv/bin/python bench/cpu_speedrun.py                       # the tuned recipe (defaults below)
    .venv/bin/python bench/cpu_speedrun.py --steps 1000 --lr 2e-3 --d-model 128 --n-layer 4 --context 64

Everything that trains is the library's own code: `Tokenizer.byte_level()`, `Decoder` (shape and attention
are config switches), `make_optimizer` (fused AdamW, decay groups), `lr_at` (warmup + cosine/WSD schedule),
`commonlm.runtime.autocast` (bf16 where the CPU has native bf16), grad clipping as the trainer does it.
Only the batch sampling (random windows of the train split, as nanoGPT samples) and the loop live here.

Data: the first 90% of the file's bytes train, the last 10% validate (nanoGPT's split). Validation loss
is the mean next-byte cross-entropy over the whole val split: non-overlapping windows of the model's
context, so every val byte after the first is predicted once from up to `context` preceding val bytes
(the first has no preceding val byte). Evaluation runs periodically (every --eval-every steps from
--eval-from on, bf16, inference mode, big batches) and its time counts: the clock starts before the first
training step and stops when an evaluation first reports <= --target. Setup (reading and tokenizing the
file, building the model) is reported separately.

Reference on the machine of env-baseline.md: nanoGPT's CPU config needs ~70 s and ends at 1.892.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table, setup_threads  # noqa: E402

from commonlm.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.model.loss import lm_loss  # noqa: E402
from commonlm.runtime import autocast, pick_device, pick_dtype  # noqa: E402
from commonlm.train.optim import lr_at, make_optimizer  # noqa: E402
from commonlm.train.trainer import resolve_vocab  # noqa: E402

DATA = Path("/work/shared/data/tinyshakespeare.txt")


def load_bytes(path: Path) -> tuple[torch.Tensor, torch.Tensor, Tokenizer]:
    text = path.read_text(encoding="utf-8")
    tok = Tokenizer.byte_level()
    lines = tok.encode_batch(text.splitlines(keepends=True))  # batched: the tokenizer's threads
    ids = np.concatenate([np.asarray(line, dtype=np.int64) for line in lines])
    assert np.array_equal(ids, np.frombuffer(text.encode("utf-8"), np.uint8))  # byte b is token b
    n = int(0.9 * len(ids))  # nanoGPT's split
    return torch.from_numpy(ids[:n]), torch.from_numpy(ids[n:]), tok


@torch.inference_mode()
def val_loss(model: Decoder, val: torch.Tensor, context: int, batch: int, device, dtype) -> float:
    """Mean cross-entropy over every val byte after the first (non-overlapping windows of `context`)."""
    model.eval()
    predicted = len(val) - 1
    n_full = predicted // context
    xs = val[: n_full * context].view(n_full, context)
    ys = val[1 : n_full * context + 1].view(n_full, context)
    chunks = [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, n_full, batch)]
    if predicted > n_full * context:  # the short last window
        chunks.append((val[n_full * context : -1][None], val[n_full * context + 1 :][None]))
    total = torch.zeros((), dtype=torch.float64)
    for x, y in chunks:
        with autocast(device, dtype):
            logits, _ = model(x.to(device))
        total += lm_loss(logits, y.to(device), reduction="sum").double().cpu()
    model.train()
    return total.item() / predicted


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--target", type=float, default=1.88)
    # model (Decoder config switches)
    ap.add_argument("--n-layer", type=int, default=3)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=0)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=0, help="0: tokenizer vocab rounded up to 64 (the library default)")
    ap.add_argument("--pos-emb", default="rope", choices=["learned", "rope"])
    ap.add_argument("--norm", default="layernorm", choices=["layernorm", "rmsnorm"])
    ap.add_argument("--mlp", default="swiglu", choices=["gelu", "gelu_tanh", "swiglu"])
    ap.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False)
    # optimisation (TrainConfig)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600, help="schedule length (max_steps)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--schedule", default="wsd", choices=["cosine", "wsd", "constant"])
    ap.add_argument("--decay-fraction", type=float, default=0.4)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--seed", type=int, default=1337)
    # evaluation
    ap.add_argument("--eval-from", type=float, default=0.9, help="first eval at this fraction of --steps")
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--eval-batch", type=int, default=64, help="windows per forward (64 is fastest on 2 cores)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-stop", action="store_true", help="train all --steps even after reaching the target")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    t_process = time.perf_counter()
    threads = setup_threads(args.threads)
    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)

    t_setup = time.perf_counter()
    train, val, tok = load_bytes(args.data)
    model_cfg = ModelConfig(
        family="gpt2" if args.pos_emb == "learned" else "llama", vocab_size=args.vocab, n_layer=args.n_layer,
        n_head=args.n_head, d_model=args.d_model, d_ff=args.d_ff, max_seq_len=args.context,
        pos_emb=args.pos_emb, norm=args.norm, mlp=args.mlp, bias=args.bias,
    )
    train_cfg = TrainConfig(
        seed=args.seed, micro_batch_size=args.batch, max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
        schedule=args.schedule, decay_fraction=args.decay_fraction, min_lr_ratio=args.min_lr_ratio,
        beta2=args.beta2, weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
    )
    config = RunConfig(model=model_cfg, train=train_cfg)
    resolve_vocab(config, tok)
    config.validate()
    model = Decoder(config.model).to(device)
    optimizer = make_optimizer(model, config.train, device)
    train = train.to(device)
    offsets = torch.arange(args.context + 1, device=device)
    setup_s = time.perf_counter() - t_setup

    first_eval = max(1, round(args.eval_from * args.steps))
    header = (f"# cpu_speedrun · {machine()} · {str(dtype).replace('torch.', '')} · load {load_average()}\n"
              f"train {len(train):,} bytes · val {len(val):,} bytes · model {model.num_params():,} params · "
              f"setup {setup_s:.2f} s")
    print(header, flush=True)

    trajectory = []  # (step, seconds, train loss (mean since last record), val loss or None)
    eval_seconds, n_evals = 0.0, 0
    reached_at = None
    final_val = float("nan")
    loss_acc, loss_n = 0.0, 0
    t0 = time.perf_counter()
    step = 0
    while step < args.steps:
        lr = lr_at(step, config.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(train) - args.context - 1, (args.batch,), device=device)
        xy = train[ix[:, None] + offsets]
        with autocast(device, dtype):
            loss = lm_loss(model(xy[:, :-1])[0], xy[:, 1:])
        loss.backward()
        loss_acc += loss.item()
        loss_n += 1
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        do_eval = step == args.steps or (step >= first_eval and (step - first_eval) % args.eval_every == 0)
        if do_eval or step % args.log_every == 0:
            v = None
            if do_eval:
                te = time.perf_counter()
                v = val_loss(model, val, args.context, args.eval_batch, device, dtype)
                eval_seconds += time.perf_counter() - te
                n_evals += 1
                final_val = v
            now = time.perf_counter() - t0
            trajectory.append((step, now, loss_acc / max(loss_n, 1), v))
            loss_acc, loss_n = 0.0, 0
            print(f"step {step:5d} · {now:6.2f} s · lr {lr:.2e} · train {trajectory[-1][2]:.4f}"
                  + (f" · val {v:.4f}" if v is not None else ""), flush=True)
            if v is not None and v <= args.target and reached_at is None:
                reached_at = (step, now)
                if not args.no_stop:
                    break
    wall = time.perf_counter() - t0

    tokens = step * args.batch * args.context
    c = config.model
    shape = (f"{c.n_layer}L d{c.d_model} h{c.n_head} ff{c.ff_dim} T{c.max_seq_len}"
             f" V{c.vocab_size} {c.pos_emb}/{c.norm}/{c.mlp}{'/bias' if c.bias else ''}")
    reached = f"{reached_at[1]:.2f}" if reached_at else f"not reached ({wall:.2f} s run)"
    rows = [[shape, f"{model.num_params() / 1e6:.2f}M", args.batch,
             f"{args.lr:g} ({args.schedule}"
             + (f" {args.decay_fraction:.0%} decay" if args.schedule == "wsd" else "")
             + f" to {args.min_lr_ratio:g}×, warmup {args.warmup}, β2 {args.beta2:g})",
             step, f"{tokens / 1e6:.2f}M", reached,
             f"{final_val:.4f}", f"{eval_seconds:.2f} ({n_evals})"]]
    print()
    print(markdown_table(["model", "params", "batch", "lr", "steps", "tokens seen", f"wall s to ≤{args.target:g}",
                          "final val loss", "eval s (n)"], rows))
    print()
    print("loss trajectory:")
    print(markdown_table(["step", "s", "train loss", "val loss"],
                         [[s, f"{t:.2f}", f"{tl:.4f}", "" if v is None else f"{v:.4f}"] for s, t, tl, v in trajectory]))
    print(f"\nsetup {setup_s:.2f} s · training+eval {wall:.2f} s · process {time.perf_counter() - t_process:.2f} s · "
          f"{threads} threads · load {load_average()}")
    if reached_at is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
