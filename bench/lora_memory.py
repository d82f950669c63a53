"""Memory and speed of LoRA and QLoRA against full fine-tuning, through the real loop (`commonlm tune sft`).

    .venv/bin/python bench/lora_memory.py                      # qwen3-100m, 2 rounds of 5 steps of 2 x 256 tokens
    .venv/bin/python bench/lora_memory.py --preset llama-125m --steps 10 --rank 8

A random base model of the preset (vocabulary 32768, so that the embeddings are as large as the preset's; the
byte tokenizer uses 320 of its ids) and synthetic conversations longer than the context are made once; then
each setting trains in its own process: full fine-tuning (the baseline), LoRA on every linear of the blocks,
and LoRA on an int8 and an int4 base (QLoRA). Peak RSS is the child's ru_maxrss (os.wait4): the whole
process, loading the base included; "RSS while stepping" is the most of its VmRSS sampled every 50 ms from
the first logged step on (weights, gradients, optimizer state, activations: what the steps hold). tokens/s
is the median of the logged steps after the first of every round (the settings run in turn, --rounds times).
Ratios are against full fine-tuning in the same run.
The machine may be shared: tokens/s are noisy there, memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import human, load_average, machine, markdown_table  # noqa: E402


def make_base_and_data(root: Path, preset: str) -> tuple[Path, Path, int]:
    import torch

    from commonlm.config import load_config
    from commonlm.data.chat import prepare_chat
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.model.decoder import Decoder
    from commonlm.modeldir import save_model_dir

    config = load_config(preset, ["model.vocab_size=32768", "model.max_seq_len=512"])
    torch.manual_seed(0)
    model = Decoder(config.model)
    save_model_dir(root / "base", model, Tokenizer.byte_level(), config)
    rng = random.Random(0)
    words = "the model reads text and learns to predict the next token from data in every step".split()
    with open(root / "chat.jsonl", "w") as f:
        for i in range(64):
            question = " ".join(rng.choice(words) for _ in range(20))
            answer = " ".join(rng.choice(words) for _ in range(60))
            f.write(json.dumps({"prompt": f"{i}: {question}", "completion": answer}) + "\n")
    prepare_chat([str(root / "chat.jsonl")], root / "base", root / "data", val_fraction=0.0)
    return root / "base", root / "data", model.num_params()


def run(name: str, flags: list[str], base: Path, data: Path, root: Path, args) -> dict:
    out = root / name
    settings = [f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
                f"train.seq_len={args.context}", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=1",
                "train.warmup_steps=0", f"train.threads={args.threads}", f"train.lora_alpha={2 * args.rank}"]
    argv = ["tune", "sft", "--init", str(base), "--data", str(data), "--out", str(out), *flags, "--set", *settings]
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed below)
    child = subprocess.Popen([sys.executable, "-m", "commonlm", *argv], stdout=log, stderr=subprocess.STDOUT)
    stepping = 0  # the most RSS seen once the first step was logged
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if (out / "metrics.jsonl").is_file() and '"step"' in (out / "metrics.jsonl").read_text():
            stepping = max(stepping, rss_of(child.pid))
        time.sleep(0.05)
    log.close()
    if status != 0:
        raise SystemExit(f"{name} failed:\n{(root / f'{name}.log').read_text()[-3000:]}")
    from commonlm.train.metrics import read_metrics

    speeds = [r["tok_per_s"] for r in read_metrics(out) if "tok_per_s" in r][1:]
    stored = sum(p.stat().st_size for p in (out / "final").iterdir())
    return {"peak": usage.ru_maxrss * 1024, "stepping": stepping, "speeds": speeds, "final": stored}


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-100m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="conversations per micro-batch")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="train.threads (0: the CPUs others leave free)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting, in alternating order")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        root = Path(tmp)
        base, data, params = make_base_and_data(root, args.preset)
        lora = ["--lora-rank", str(args.rank)]
        settings = [("full fine-tuning", []), (f"LoRA r={args.rank}", lora),
                    (f"QLoRA int8 r={args.rank}", [*lora, "--quantize-base", "int8"]),
                    (f"QLoRA int4 r={args.rank}", [*lora, "--quantize-base", "int4"])]
        runs = [[run(f"run{i}-{r}", flags, base, data, root, args) for i, (_, flags) in enumerate(settings)]
                for r in range(args.rounds)]
    results = []  # per setting: the most memory of its rounds, the median speed of all their steps
    for i, (name, _) in enumerate(settings):
        mine = [rounds[i] for rounds in runs]
        results.append({"name": name, "peak": max(m["peak"] for m in mine),
                        "stepping": max(m["stepping"] for m in mine), "final": mine[-1]["final"],
                        "tok_s": statistics.median(s for m in mine for s in m["speeds"])})
    full = results[0]
    rows = [[r["name"], f"{r['peak'] / 2**20:,.0f} MiB", f"{r['peak'] / full['peak']:.2f}x",
             f"{r['stepping'] / 2**20:,.0f} MiB", f"{r['stepping'] / full['stepping']:.2f}x", f"{human(r['tok_s'])}",
             f"{r['tok_s'] / full['tok_s']:.2f}x", f"{r['final'] / 2**20:,.1f} MiB"] for r in results]
    print(f"\n{args.preset}: {human(params)} parameters (random), {args.rounds} x {args.steps} steps of {args.batch} x "
          f"{args.context} tokens, bf16 autocast where the CPU has it; {machine()}; load average {load_average()}\n")
    print(markdown_table(["setting", "peak RSS", "vs full", "RSS while stepping", "vs full", "tokens/s", "vs full",
                          "final/ on disk"], rows))


if __name__ == "__main__":
    main()
