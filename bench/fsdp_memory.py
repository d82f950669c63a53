"""Memory per process of FSDP2 (train.parallel=fsdp) against DDP, through the real loop under torchrun.

    .venv/bin/python bench/fsdp_memory.py                       # qwen3-100m, 2 processes, 3 steps of 2 x 256 tokens
    .venv/bin/python bench/fsdp_memory.py --preset llama-125m --nproc 2 --steps 4

Pretraining from a random initialisation of the preset (vocabulary 32768, so that the embeddings are as large as
the preset's; the byte tokenizer uses 320 of its ids) on a small synthetic corpus, once with DDP (the baseline)
and once with FSDP, each a `torchrun --nproc_per_node N -m commonlm train` of its own (gloo on 127.0.0.1 on CPU).
For each worker process: peak RSS (VmHWM: the whole process, start-up and the whole-model initialisation
included) and "RSS while stepping", the most of its VmRSS sampled every 50 ms between the end of the first step
and the end of the last (weights, gradients, optimizer state, activations, gathered blocks: what the steps hold;
not the checkpoint and model directory written at the end, where rank 0 gathers the whole weights). Memory a
process has freed may stay in its RSS (the allocator keeps it): under FSDP that is the whole-model initialisation
before sharding. The table shows the largest worker of each setting; ratios are against DDP in the same run.
The machine may be shared: tokens/s are noisy there, memory is not.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import human, load_average, machine, markdown_table  # noqa: E402


def make_data(root: Path) -> Path:
    from commonlm.data.prepare import prepare
    from commonlm.data.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "the model reads text and learns to predict the next token from data in every step".split()
    (root / "corpus").mkdir()
    for i in range(40):
        (root / "corpus" / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)) + "\n")
    Tokenizer.byte_level().save(root / "tok")
    prepare([str(root / "corpus")], root / "tok", root / "data", val_fraction=0.0, workers=1, progress=False)
    return root / "data"


def run(parallel: str, data: Path, root: Path, args) -> dict:
    out = root / parallel
    settings = [f"train.parallel={parallel}", "model.vocab_size=32768", f"train.max_steps={args.steps}",
                "train.tokens_per_step=0", f"train.micro_batch_size={args.batch}", f"train.seq_len={args.context}",
                "train.eval_every=0", "train.ckpt_every=0", "train.log_every=1", "train.warmup_steps=0",
                f"train.threads={args.threads}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", f"--master_port={29500 + random.Random().randrange(1000)}", "-m", "commonlm",
           "train", "--config", args.preset, "--data", str(data), "--out", str(out), "--set", *settings]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(args.threads)}
    log = open(root / f"{parallel}.log", "w")  # noqa: SIM115 (closed below)
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peak: dict[int, int] = {}
    stepping: dict[int, int] = {}
    try:
        while launcher.poll() is None:
            logged = (out / "metrics.jsonl").read_text().count('"loss"') if (out / "metrics.jsonl").is_file() else 0
            stepping_now = 1 <= logged < args.steps  # from the first step's end to the last one's
            for pid in children(launcher.pid):
                status = status_of(pid)
                if "VmHWM" in status:
                    peak[pid] = max(peak.get(pid, 0), status["VmHWM"])
                    if stepping_now:
                        stepping[pid] = max(stepping.get(pid, 0), status["VmRSS"])
            time.sleep(0.05)
    finally:  # (interrupted: the workers go too)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        log.close()
    if launcher.returncode != 0:
        raise SystemExit(f"{parallel} failed:\n{(root / f'{parallel}.log').read_text()[-3000:]}")
    from commonlm.train.metrics import read_metrics

    speeds = [r["tok_per_s"] for r in read_metrics(out) if "tok_per_s" in r][1:]
    return {"peak": max(peak.values()), "stepping": max(stepping.values()), "workers": len(peak),
            "tok_s": sorted(speeds)[len(speeds) // 2] if speeds else float("nan")}


def children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []


def status_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes ({} once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "VmHWM")}
    except OSError:
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-100m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch, per process")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = parser.parse_args()

    import torch

    from commonlm.config import load_config
    from commonlm.model.decoder import Decoder

    with torch.device("meta"):
        params = Decoder(load_config(args.preset, ["model.vocab_size=32768"]).model).num_params()
    with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as tmp:
        root = Path(tmp)
        data = make_data(root)
        results = {name: run(name, data, root, args) for name in ("ddp", "fsdp")}
    ddp = results["ddp"]
    rows = [[name, r["workers"], f"{r['peak'] / 2**20:,.0f} MiB", f"{r['peak'] / ddp['peak']:.2f}x",
             f"{r['stepping'] / 2**20:,.0f} MiB", f"{r['stepping'] / ddp['stepping']:.2f}x", human(r["tok_s"]),
             f"{r['tok_s'] / ddp['tok_s']:.2f}x"] for name, r in results.items()]
    print(f"\n{args.preset}: {human(params)} parameters (random), {args.nproc} processes x {args.threads} thread(s), "
          f"{args.steps} steps of {args.batch} x {args.context} tokens per process, train.dtype=auto; {machine()}; "
          f"load average {load_average()}\n")
    print(markdown_table(["train.parallel", "workers", "peak RSS / worker", "vs ddp", "RSS while stepping / worker",
                          "vs ddp", "tokens/s", "vs ddp"], rows))


if __name__ == "__main__":
    main()
