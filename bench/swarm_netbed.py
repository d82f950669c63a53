"""Training speed over a home-internet link: DDP (every step's gradients) against DiLoCo volunteers (every H steps),
two machines joined by 20 mbit links.

    .venv/bin/python bench/swarm_netbed.py                    # tiny preset, 100 steps per process, H = 50
    .venv/bin/python bench/swarm_netbed.py --rate 100mbit --steps 200 --sync-every 50 100

The machines are hosts of the namespace test bed (tests/scale/netbed.py: needs root and iproute2): each its own
network namespace, linked to one switch by a veth rate-limited with `tc tbf` both ways. DDP is `torchrun
--nnodes 2` with one process on each of hosts 2 and 3 (gloo over the limited links); DiLoCo is a `commonlm swarm
lighthouse` on host 1 and a `commonlm train --swarm` volunteer on each of hosts 2 and 3, each on its own half of
the corpus. Same model, micro-batch and steps per process in every setting. Tokens/s is what all processes
trained together per second of training (from each run's metrics: its log intervals' tokens and rates, start-up
not counted); the ratio is against DDP measured in the same run. The bed's links only limit the rate (this
kernel has no netem: no added latency or loss), so a real home link, with tens of ms of latency, is slower for
DDP still. The CPU may be shared with other work: the ratio, not the absolute rate, is the result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # (for the test bed, which lives with the tests)
from common import human, load_average, machine, markdown_table  # noqa: E402
from swarm_bytes import make_data  # noqa: E402

from tests.scale.netbed import SUBNET, netbed, netbed_unavailable  # noqa: E402

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_args(args, data: Path, out: Path, *settings: str) -> list[str]:
    return ["train", "--config", args.preset, "--data", str(data), "--out", str(out), "--set",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", f"train.seq_len={args.context}",
            "train.eval_every=0", "train.ckpt_every=0", "train.log_every=10", "train.threads=1", "train.dtype=fp32",
            *settings]


def run_all(commands: list[tuple], root: Path, name: str) -> None:
    """Start (host, argv) pairs together, wait for all; fail with their logs if one fails."""
    with ExitStack() as stack:
        procs = []
        for i, (host, argv) in enumerate(commands):
            log = stack.enter_context(open(root / f"{name}-{i}.log", "w"))
            procs.append(subprocess.Popen(host.cmd(argv), stdout=log, stderr=subprocess.STDOUT, env=ENV))
        try:
            codes = [proc.wait(timeout=3600) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
    if any(codes):
        logs = "".join((root / f"{name}-{i}.log").read_text()[-2000:] for i in range(len(commands)))
        raise SystemExit(f"{name} failed ({codes}):\n{logs}")


def rate(run: Path) -> tuple[int, float]:
    """(tokens, seconds of training) of a run, from its logged intervals."""
    from commonlm.train.metrics import read_metrics

    tokens, seconds = 0, 0.0
    for record in read_metrics(run):
        if "tok_per_s" in record:
            seconds += (record["tokens"] - tokens) / record["tok_per_s"]
            tokens = record["tokens"]
    return tokens, seconds


def ddp(args, bed, data: list[Path], root: Path) -> float:
    runs = []
    for rank, host in enumerate(bed.hosts[1:3]):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    f"--node_rank={rank}", f"--master_addr={SUBNET}.2", "--master_port=29500", "-m", "commonlm",
                    *train_args(args, data[0], root / "ddp")]
        runs.append((host, torchrun))
    run_all(runs, root, "ddp")
    tokens, seconds = rate(root / "ddp")  # (rank 0's metrics; its tokens count both processes')
    return tokens / seconds


def diloco(args, bed, data: list[Path], root: Path, sync_every: int) -> float:
    name = f"diloco-h{sync_every}"
    lighthouse = [sys.executable, "-m", "commonlm", "swarm", "lighthouse", "--bind", f"{SUBNET}.1:29510",
                  "--min-replicas", "2"]
    with open(root / f"{name}-lighthouse.log", "w") as log:
        coordinator = subprocess.Popen(bed.hosts[0].cmd(lighthouse), stdout=log, stderr=subprocess.STDOUT, env=ENV)
        try:
            run_all([(host, [sys.executable, "-m", "commonlm",
                             *train_args(args, data[i], root / f"{name}-{i}", f"train.swarm={SUBNET}.1:29510",
                                         f"train.swarm_sync_every={sync_every}")])
                     for i, host in enumerate(bed.hosts[1:3])], root, name)
        finally:
            coordinator.kill()
            coordinator.wait()
    volunteers = [rate(root / f"{name}-{i}") for i in range(2)]
    return sum(tokens for tokens, _ in volunteers) / max(seconds for _, seconds in volunteers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=100, help="steps per process (a multiple of every H)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch, per process")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--sync-every", type=int, nargs="+", default=[50])
    parser.add_argument("--rate", default="20mbit", help="each link's rate, each way (a tc rate)")
    args = parser.parse_args()
    if (why := netbed_unavailable()) is not None:
        raise SystemExit(f"cannot build the namespace test bed here: {why}")

    import torch

    from commonlm.config import load_config
    from commonlm.model.decoder import Decoder

    with torch.device("meta"):
        params = Decoder(load_config(args.preset, ["model.vocab_size=320"]).model).num_params()
    with tempfile.TemporaryDirectory(prefix="swarm-netbed-") as tmp, netbed(3, rate=args.rate) as bed:
        root = Path(tmp)
        data = make_data(root)
        base = ddp(args, bed, data, root)
        rows = [["DDP (all-reduce every step)", f"{base:,.0f}", "1x"]]
        for sync_every in args.sync_every:
            speed = diloco(args, bed, data, root, sync_every)
            rows.append([f"DiLoCo H={sync_every}", f"{speed:,.0f}", f"{speed / base:.1f}x"])
    print(f"\n{args.preset}: {human(params)} parameters (vocab 320), 2 hosts x 1 process x 1 thread, links "
          f"{args.rate} each way (tc tbf, no added latency), {args.steps} steps of {args.batch} x {args.context} "
          f"tokens per process, fp32; {machine()}; load average {load_average()}\n")
    print(markdown_table(["setting", "tokens/s (both processes)", "vs DDP"], rows))


if __name__ == "__main__":
    main()
