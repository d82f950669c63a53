"""Bytes on the wire: DDP (every step's gradients) against DiLoCo volunteers (scale/swarm.py, every H steps).

    .venv/bin/python bench/swarm_bytes.py            # 2 processes, 200 steps, H = 50 and 100, fp32, bf16, int8, top-k
    .venv/bin/python bench/swarm_bytes.py --steps 400 --preset tiny --compress int8 --topk 0.01

Each setting runs in a network namespace of its own (`unshare -n`: needs root) with only a loopback device, so
the bytes that loopback device transmitted over the run (/proc/net/dev, TCP/IP headers included) are all the
traffic of that run and nothing else's: DDP is `torchrun --nproc_per_node 2 -m commonlm train` (gloo), DiLoCo a
`commonlm swarm lighthouse` and two `commonlm train --swarm` volunteers on their own halves of the corpus
(lighthouse heartbeats and quorums included). Reported per process and per 1,000 steps, with the ratio against
DDP measured in the same run, and next to it what the volunteers logged per sync (swarm_sent_bytes, counted per
collective in scale/compress.py: 2(n-1)/n of the payload for the ring all-reduce (fp32, bf16) and for int8's
all-to-all + all-gather, (n-1) times it for top-k's all-gather). Same model, micro-batch and steps in every
setting; DDP's global batch is the two processes' together, as the volunteers' is. The volunteers' last training
loss (each on its own data, so only a sign that a setting did not diverge) is beside it. Wall time is the whole
command, start-up included, on a machine that may be shared: bytes, not time, are the result here.
"""

from __future__ import annotations

import argparse
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import human, load_average, machine, markdown_table  # noqa: E402


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"

LOOPBACK_TX = "awk '$1 == \"lo:\" {print $10}' /proc/net/dev"


def make_data(root: Path) -> list[Path]:
    """Two volunteers' own data (different documents), one byte tokenizer."""
    from commonlm.data.prepare import prepare
    from commonlm.data.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "the model reads text and learns to predict the next token from data in every step".split()
    Tokenizer.byte_level().save(root / "tok")
    dirs = []
    for half in range(2):
        corpus = root / f"corpus{half}"
        corpus.mkdir()
        for i in range(20):
            (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)) + "\n")
        prepare([str(corpus)], root / "tok", root / f"data{half}", val_fraction=0.0, workers=1, progress=False)
        dirs.append(root / f"data{half}")
    return dirs


def in_namespace(script: str, root: Path, name: str) -> tuple[int, float]:
    """Run a bash script in a fresh network namespace: (bytes its loopback sent, seconds)."""
    path = root / f"{name}.sh"
    path.write_text("\n".join(["set -eu", "ip link set lo up", "export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1",
                               f"BEFORE=$({LOOPBACK_TX})", script,
                               f'echo "LOOPBACK_TX $(( $({LOOPBACK_TX}) - BEFORE ))"']))
    start = time.perf_counter()
    proc = subprocess.run(["unshare", "-n", "bash", str(path)], capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "LOOPBACK_TX" not in proc.stdout:
        logs = "".join(p.read_text()[-2000:] for p in root.glob(f"{name}*.log"))
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}{logs}")
    return int(proc.stdout.split("LOOPBACK_TX")[-1].split()[0]), seconds


def train_cmd(args, data: Path, out: Path, flags: list[str], *settings: str) -> list[str]:
    return [sys.executable, "-m", "commonlm", "train", "--config", args.preset, "--data", str(data), "--out",
            str(out), *flags, "--set", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
            f"train.seq_len={args.context}", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=50",
            "train.threads=1", "train.dtype=fp32", *settings]


def ddp(args, data: list[Path], root: Path) -> tuple[int, float]:
    cmd = train_cmd(args, data[0], root / "ddp", [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", "--master_port=29500", *cmd[1:]]
    return in_namespace(f"{shlex.join(torchrun)} > {root}/ddp.log 2>&1", root, "ddp")


def diloco(args, data: list[Path], root: Path, sync_every: int, compress: str) -> tuple[int, float, int, float]:
    name = f"diloco-h{sync_every}-{compress}"
    lighthouse = [sys.executable, "-m", "commonlm", "swarm", "lighthouse", "--bind", "127.0.0.1:29510",
                  "--min-replicas", "2"]
    lines = [f"{shlex.join(lighthouse)} > {root}/{name}-lighthouse.log 2>&1 &", "LH=$!"]
    for i in range(2):
        cmd = train_cmd(args, data[i], root / f"{name}-{i}", ["--swarm", "127.0.0.1:29510"],
                        f"train.swarm_sync_every={sync_every}", f"train.swarm_compress={compress}",
                        f"train.swarm_topk={args.topk}")
        lines += [f"{shlex.join(cmd)} > {root}/{name}-{i}.log 2>&1 &", f"V{i}=$!"]
    lines += ["wait $V0", "wait $V1", "kill -TERM $LH", "wait $LH"]
    sent, seconds = in_namespace("\n".join(lines), root, name)
    from commonlm.train.metrics import read_metrics

    records = [read_metrics(root / f"{name}-{i}") for i in range(2)]
    logged = sum(r["swarm_sent_bytes"] for run in records for r in run if "swarm_sent_bytes" in r)
    final_loss = sum([r["loss"] for r in run if "loss" in r][-1] for run in records) / 2
    return sent, seconds, logged, final_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200, help="steps per process (a multiple of every H)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch, per process")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--sync-every", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--compress", nargs="+", default=["none", "bf16", "int8", "topk"],
                        choices=["none", "bf16", "int8", "topk"])
    parser.add_argument("--topk", type=float, default=0.01, help="topk: the fraction of entries sent")
    args = parser.parse_args()

    import torch

    from commonlm.config import load_config
    from commonlm.model.decoder import Decoder
    from commonlm.scale.compress import BLOCK

    with torch.device("meta"):
        params = Decoder(load_config(args.preset, ["model.vocab_size=320"]).model).num_params()
    per_k = 1000 / args.steps / 2  # per process and per 1,000 steps
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        root = Path(tmp)
        data = make_data(root)
        base, base_s = ddp(args, data, root)
        rows = [["DDP (all-reduce every step)", "-", megabytes(base * per_k), "1x", "-", "-", f"{base_s:.0f}s"]]
        labels = {"none": "fp32", "bf16": "bf16", "int8": f"int8 + fp32 scale / {BLOCK}",
                  "topk": f"top-{args.topk:g} (int32 + bf16)"}
        for sync_every in args.sync_every:
            for compress in args.compress:
                sent, seconds, logged, loss = diloco(args, data, root, sync_every, compress)
                rows.append([f"DiLoCo H={sync_every}", labels[compress], megabytes(sent * per_k),
                             f"{base / sent:.0f}x", megabytes(logged * per_k), f"{loss:.3f}", f"{seconds:.0f}s"])
    print(f"\n{args.preset}: {human(params)} parameters (vocab 320), 2 processes x 1 thread, {args.steps} steps of "
          f"{args.batch} x {args.context} tokens per process, fp32; {machine()}; load average {load_average()}\n")
    print(markdown_table(["setting", "pseudo-gradients sent as", "on the wire / process / 1k steps",
                          "less than DDP", "logged by the volunteers", "last train loss (mean of 2)", "wall"], rows))


if __name__ == "__main__":
    main()
