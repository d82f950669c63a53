"""Single-stream decode with and without huge pages for PyTorch's large tensors (THP_MEM_ALLOC_ENABLE,
which the commonlm CLI and these benchmarks turn on).

    .venv/bin/python bench/huge_pages.py [--rounds 3] [--variants bf16,int8,int4]

PyTorch reads the setting once per process, so each timing is a fresh process (this script, with
--child), alternating off and on, `rounds` times each; the table gives the median per setting. Same
model, prompt and timing as bench/decode.py (eager, greedy, 128 new tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import load_average, machine, markdown_table, setup_threads  # noqa: E402
from decode import bench_prompt, gpt2_small, time_ours  # noqa: E402

from commonlm.infer.quant import quantize_model  # noqa: E402


def child(variant: str) -> None:
    setup_threads()
    model = gpt2_small(torch.device("cpu")).to(torch.bfloat16)
    if variant != "bf16":
        quantize_model(model, variant, dtype=torch.bfloat16)
    prompt = bench_prompt()
    time_ours(model, prompt)  # warm-up
    print(statistics.median(time_ours(model, prompt)[1] for _ in range(3)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="bf16,int8,int4")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    variants = args.variants.split(",")
    if unknown := set(variants) - {"bf16", "int8", "int4"}:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))} (choose from bf16, int8, int4)")
    print(f"{machine()}; load {load_average()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    rows = []
    for variant in variants:
        times: dict[str, list[float]] = {"0": [], "1": []}
        for _ in range(args.rounds):
            for setting in ("0", "1"):
                env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
                out = subprocess.run([sys.executable, __file__, "--child", variant], env=env, check=True,
                                     capture_output=True, text=True).stdout
                times[setting].append(float(out.strip().splitlines()[-1]))
        off, on = statistics.median(times["0"]), statistics.median(times["1"])
        rows.append([variant, f"{1000 * off:.2f}", f"{1000 * on:.2f}", f"{off / on:.2f}x"])
    print(f"GPT-2 small shape, batch 1, eager, decode ms/token; median of {args.rounds} processes per setting\n")
    print(markdown_table(["weights", "4 KiB pages", "huge pages", "speed-up"], rows))


if __name__ == "__main__":
    main()
