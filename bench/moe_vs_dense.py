"""Mixture of experts vs a dense model of equal active parameters: tokens/s and validation loss at equal wall time.

    .venv/bin/python bench/moe_vs_dense.py                       # 60 s of training each, tinyshakespeare, CPU
    .venv/bin/python bench/moe_vs_dense.py --seconds 0                       # the one-layer table only

Both models are the CPU speedrun's shape (bench/cpu_speedrun.py: 3 layers, d_model 128, byte tokens, context 64)
trained through the one loop (`commonlm.train.trainer.train`) with the same data, seed, batch and a constant
learning rate after warmup, each for the same wall time (train.max_time), then evaluated on the same validation
tokens. The dense model's SwiGLU is d_ff wide; the mixture has n_experts experts of d_ff / top_k each and runs
top_k of them per token, so both run the same matmul weights per token (the mixture adds its router). Tokens/s is
the tokens trained over the wall time given (setup included, the same for both); ratios are against the dense model
of the same run. The mixture's router metrics (model/moe.py `router_metrics`) are those of its last log step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import load_average, machine, markdown_table, median, setup_threads, time_steps  # noqa: E402
from cpu_speedrun import DATA, prepare  # noqa: E402

from commonlm.config import ModelConfig, load_config  # noqa: E402
from commonlm.model.decoder import SwiGLU  # noqa: E402
from commonlm.model.moe import MoE, grouped_mm  # noqa: E402
from commonlm.modeldir import load_model_dir  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402
from commonlm.train.trainer import train  # noqa: E402


def run(name: str, data: Path, out: Path, seconds: float, threads: int, model: list[str]) -> dict:
    overrides = [*model, "train.schedule=constant", "train.max_steps=1000000", f"train.max_time={seconds}",
                 "train.eval_every=0", "train.eval_tokens=65536", "train.target_val_loss=0", "train.log_every=10",
                 f"train.threads={threads}", "train.dtype=fp32"]
    config = load_config("speedrun-cpu", overrides)
    config.data.path = str(data)
    result = train(config, out)
    records = read_metrics(out)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    routers = [r for r in records if "moe_balance" in r]  # (the router metrics of the last log step)
    decoder = load_model_dir(result.final_dir)[0]
    tokens = result.step * config.train.micro_batch_size * config.model.max_seq_len
    return {"name": name, "steps": result.step, "tok_s": tokens / seconds, "val": vals[-1],
            "params": decoder.num_params(), "flops": decoder.flops_per_token(config.model.max_seq_len),
            "router": f"{routers[-1]['moe_balance']:.2f} / {routers[-1]['moe_router_entropy']:.2f}" if routers else "-"}


def layer_times(d_model: int, d_ff: int, experts: int, top_k: int, tokens: int = 1024) -> list[list[str]]:
    """Forward + backward of one MLP over `tokens` tokens: the dense SwiGLU, the mixture with the grouped kernel and
    with the loop over experts, and the experts' matmuls alone both ways; median ms, interleaved rounds."""
    torch.manual_seed(0)
    dense = SwiGLU(ModelConfig(d_model=d_model, d_ff=d_ff))
    moe = MoE(ModelConfig(d_model=d_model, n_experts=experts, experts_per_token=top_k, expert_ff_dim=d_ff // top_k))
    moe.reset_parameters()
    x = torch.randn(tokens, d_model, requires_grad=True)
    counts = torch.bincount(moe.route(x)[0].flatten(), minlength=experts)
    copies = torch.randn(tokens * top_k, d_model, requires_grad=True)

    def layer(module: torch.nn.Module, kernel: bool = True) -> None:
        moe.experts.kernel = kernel
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()

    def matmuls(kernel: bool) -> None:
        grouped_mm(copies, moe.experts.gate_up_proj, counts, kernel).square().mean().backward()

    cases = {"dense SwiGLU": lambda: layer(dense), "MoE, grouped kernel": lambda: layer(moe),
             "MoE, loop over experts": lambda: layer(moe, kernel=False),
             "experts' gate/up matmul, grouped kernel": lambda: matmuls(True),
             "experts' gate/up matmul, loop over experts": lambda: matmuls(False)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(5):
        for name, case in cases.items():
            times[name] += time_steps(case, warmup=2, steps=5, device=torch.device("cpu"))
    baseline = {name: "experts' gate/up matmul, loop over experts" if name.startswith("experts") else "dense SwiGLU"
                for name in cases}
    base = {name: median(times[baseline[name]]) for name in cases}
    return [[name, f"{1e3 * median(t):.2f}", f"{base[name] / median(t):.2f}x"] for name, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help=f"tinyshakespeare.txt (default: {DATA})")
    ap.add_argument("--seconds", type=float, default=60.0, help="training wall time of each model (0: layers only)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=384, help="the dense model's SwiGLU width (speedrun-cpu's default)")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"moe_vs_dense: {args.data} not found; pass --data PATH to tinyshakespeare.txt")
    if args.d_ff % args.top_k:
        raise SystemExit(f"moe_vs_dense: --d-ff {args.d_ff} must be divisible by --top-k {args.top_k}")
    threads = setup_threads(args.threads)
    moe = [f"model.n_experts={args.experts}", f"model.experts_per_token={args.top_k}",
           f"model.expert_ff_dim={args.d_ff // args.top_k}", "model.balance_rate=1e-3"]
    print(f"# moe_vs_dense · {machine()} · load {load_average()}\n\none MLP, forward + backward, 1024 tokens, "
          f"d_model 128 (speed vs the dense SwiGLU; the matmuls alone vs the loop)\n")
    print(markdown_table(["", "ms", "speed"], layer_times(128, args.d_ff, args.experts, args.top_k)))
    if not args.seconds:
        return
    with tempfile.TemporaryDirectory(prefix="moe_vs_dense-") as tmp:
        data = prepare(args.data, Path(tmp))
        print(f"\ntraining {args.seconds:g} s each through the loop · load {load_average()}", flush=True)
        results = [run("dense", data, Path(tmp) / "dense", args.seconds, threads, [f"model.d_ff={args.d_ff}"]),
                   run(f"moe {args.experts}x{args.d_ff // args.top_k}, top-{args.top_k}", data, Path(tmp) / "moe",
                       args.seconds, threads, moe)]
    base = results[0]
    rows = [[r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['flops'] / 6 / 1e6:.3f}M", r["steps"], f"{r['tok_s']:,.0f}",
             f"{r['tok_s'] / base['tok_s']:.2f}x", f"{r['val']:.4f}", f"{r['val'] - base['val']:+.4f}", r["router"]]
            for r in results]
    print()
    print(markdown_table(["model", "params", "active (FLOPs/6 per token)", "steps", "tok/s", "tok/s vs dense",
                          f"val loss after {args.seconds:g} s", "vs dense",
                          "router balance (max/mean load) / entropy, last log step"], rows))
    print(f"\nload {load_average()}")


if __name__ == "__main__":
    main()
