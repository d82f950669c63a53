"""Validation loss at equal tokens: DiLoCo volunteers (scale/swarm.py) against DDP and against one process.

    .venv/bin/python bench/diloco_quality.py                  # nanogpt-cpu, 600 steps, H = 50 and 100, fp32 and bf16
    .venv/bin/python bench/diloco_quality.py --steps 400 --sync-every 100 --compress none
    .venv/bin/python bench/diloco_quality.py --sync-every 100 --compress none --no-single \
        --variant --variant swarm_outer_lr=1.0 --variant swarm_outer_momentum=0.8 --variant swarm_fragments=2

The question DiLoCo has to answer: for the same tokens of training, how much worse is a model whose two halves
trained apart and met only every H steps than one trained with every step's gradients shared? Same model and
settings everywhere (the preset's, train.seed alike: every run starts from the same weights, fp32), same data and
the same number of tokens processed in total:

- data: tinyshakespeare with nanoGPT's split (the first 90% of the bytes train, the rest validates; prepared as
  bench/cpu_speedrun.py does), and the training bytes cut into two halves, each prepared alone with the same byte
  tokenizer;
- DiLoCo: a `commonlm swarm lighthouse` and two `commonlm train --swarm` volunteers on 127.0.0.1, each on its own
  half only, `micro_batch_size` sequences a step each, the outer step every H steps (max_steps a multiple of H, so
  the last step is a sync and both volunteers end on the same global weights), pseudo-gradients sent as fp32 or
  as bf16 with error feedback;
- DDP: `torchrun --nproc_per_node 2 -m commonlm train` on the whole training split, the same global batch per step
  (each rank its block: the two volunteers' batches together);
- one process: the whole split, a micro-batch twice the size (the same global batch again).

Every process runs one thread (two OpenMP threads in one process on a busy 2-core machine ran 7x slower).

Evaluation is the same for every run: `commonlm eval RUN/final --data DATA`, the mean next-byte cross-entropy over
the whole validation split. Each DiLoCo volunteer's final model is evaluated (they should agree to the last digit:
the table says whether they did). The ratio is against DDP's loss in the same run (the goal: within 3%).

Tuning DiLoCo: each `--variant` is one DiLoCo setting (train.* overrides for the volunteers only, e.g.
`swarm_outer_lr=1.0 swarm_outer_momentum=0.8`; an empty `--variant` is the preset's and the config's defaults),
run for every H and compression after one DDP baseline, so every setting is compared with a DDP run of the same
invocation. `--set` changes every run, DDP's included (an inner schedule tried on both sides). Every
process runs in a subprocess with a time limit (--limit); the machine may be shared, so wall times are only
what this run took.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table  # noqa: E402
from cpu_speedrun import DATA, prepare  # noqa: E402

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
COMMONLM = [sys.executable, "-m", "commonlm"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def halves(text: Path, work: Path) -> list[Path]:
    """The training bytes (the first 90%) in two halves, each prepared alone with the tokenizer in work/tok."""
    train = text.read_bytes()[: int(0.9 * text.stat().st_size)]
    dirs = []
    for i, part in enumerate((train[: len(train) // 2], train[len(train) // 2:])):
        (work / f"half{i}.txt").write_bytes(part)
        run_all([COMMONLM + ["data", "prepare", "--input", str(work / f"half{i}.txt"), "--tokenizer", str(work / "tok"),
                             "--out", str(work / f"half{i}"), "--val-fraction", "0"]], work, f"prepare-half{i}", 600)
        dirs.append(work / f"half{i}")
    return dirs


def run_all(commands: list[list[str]], work: Path, name: str, limit: float,
            background: list[str] | None = None) -> float:
    """Start the commands together (and `background`, killed after them), wait for all within `limit` seconds;
    wall seconds. Fails with the logs' tails if one fails or runs out of time."""
    start = time.perf_counter()
    with ExitStack() as stack:
        def popen(argv: list[str], log: Path) -> subprocess.Popen:
            out = stack.enter_context(open(log, "w"))
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
            stack.callback(lambda: proc.poll() is None and os.killpg(proc.pid, 9))
            return proc

        if background:
            popen(background, work / f"{name}-background.log")
            time.sleep(2)  # (the lighthouse listening before the volunteers ask it)
        procs = [popen(argv, work / f"{name}-{i}.log") for i, argv in enumerate(commands)]
        try:
            codes = [proc.wait(timeout=max(1.0, limit - (time.perf_counter() - start))) for proc in procs]
        except subprocess.TimeoutExpired:
            codes = ["timeout"]
    if any(codes):
        logs = "".join((work / f"{name}-{i}.log").read_text(errors="replace")[-1500:] for i in range(len(commands)))
        raise SystemExit(f"diloco_quality: {name} failed ({codes}, limit {limit:.0f} s):\n{logs}")
    return time.perf_counter() - start


def train_args(args, data: Path, out: Path, batch: int, threads: int, flags: list[str], *settings: str) -> list[str]:
    return ["train", "--config", args.preset, "--data", str(data), "--out", str(out), *flags, "--set",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={batch}", "train.eval_every=0",
            "train.ckpt_every=0", "train.log_every=50", f"train.threads={threads}", "train.dtype=fp32", *settings]


def evaluate(model: Path, data: Path, work: Path, limit: float) -> float:
    """`commonlm eval MODEL --data DATA`: the validation loss it prints."""
    name = f"eval-{model.parent.name}"
    run_all([COMMONLM + ["eval", str(model), "--data", str(data)]], work, name, limit)
    found = re.search(r"val: loss (\d+\.\d+)", (work / f"{name}-0.log").read_text())
    if not found:
        raise SystemExit(f"diloco_quality: no loss in {work / f'{name}-0.log'}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help=f"tinyshakespeare.txt (default: {DATA})")
    parser.add_argument("--preset", default="nanogpt-cpu")
    parser.add_argument("--steps", type=int, default=600, help="steps of every run (a multiple of every H)")
    parser.add_argument("--batch", type=int, default=12, help="sequences per micro-batch of a volunteer or rank")
    parser.add_argument("--sync-every", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--compress", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--variant", nargs="*", action="append", metavar="KEY=VALUE",
                        help="one DiLoCo setting: train.* overrides for the volunteers (repeat; empty: the defaults)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="train.* overrides for every run (DDP, one process, DiLoCo)")
    parser.add_argument("--no-single", action="store_true", help="skip the one-process run (it equals DDP)")
    parser.add_argument("--limit", type=float, default=900, help="seconds each training run may take")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here (default: a temporary dir)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # (as every process below runs: the header's thread count says so)
    if any(args.steps % h for h in args.sync_every):
        raise SystemExit(f"diloco_quality: --steps {args.steps} must be a multiple of every --sync-every")
    shared = [setting if setting.startswith("train.") else f"train.{setting}" for setting in args.set]
    variants = [[setting if setting.startswith("train.") else f"train.{setting}" for setting in variant]
                for variant in (args.variant or [[]])]

    with tempfile.TemporaryDirectory(prefix="diloco_quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare(args.data, work)  # work/tok, work/data: nanoGPT's split
        own = halves(args.data, work)
        print(f"# diloco_quality · {args.preset} · {args.steps} steps{''.join(' · ' + s for s in shared)} · "
              f"{machine()} · load {load_average()}", flush=True)
        rows = []

        def report(name: str, runs: list[Path], wall: float, syncs: str) -> None:
            losses = [evaluate(run / "final", data, work, args.limit) for run in runs]
            rows.append([name, syncs, losses, wall])
            print(f"{name}: val loss {', '.join(f'{x:.4f}' for x in losses)} · {wall:.0f} s · load {load_average()}",
                  flush=True)

        port = free_port()
        ddp = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "commonlm",
               *train_args(args, data, work / "ddp", args.batch, 1, [], *shared)]
        report("DDP, 2 processes (baseline)", [work / "ddp"], run_all([ddp], work, "ddp", args.limit), "every step")
        if not args.no_single:
            single = COMMONLM + train_args(args, data, work / "single", 2 * args.batch, 1, [], *shared)
            report("one process", [work / "single"], run_all([single], work, "single", args.limit), "-")
        for sync_every in args.sync_every:
            for compress in args.compress:
                for number, variant in enumerate(variants):
                    name = f"diloco-h{sync_every}-{compress}-v{number}"
                    port = free_port()
                    lighthouse = COMMONLM + ["swarm", "lighthouse", "--bind", f"127.0.0.1:{port}",
                                             "--min-replicas", "2"]
                    volunteers = [COMMONLM + train_args(args, own[i], work / f"{name}-{i}", args.batch, 1,
                                                        ["--swarm", f"127.0.0.1:{port}"], *shared,
                                                        f"train.swarm_sync_every={sync_every}",
                                                        f"train.swarm_compress={compress}", *variant)
                                  for i in range(2)]
                    wall = run_all(volunteers, work, name, args.limit, background=lighthouse)
                    label = {"none": "fp32", "bf16": "bf16"}[compress]
                    tuned = "".join(f", {setting.removeprefix('train.')}" for setting in variant)
                    report(f"DiLoCo H={sync_every}, {label} pseudo-gradients{tuned}",
                           [work / f"{name}-{i}" for i in range(2)], wall, f"every {sync_every} steps")

    from commonlm.config import load_config

    baseline = rows[0][2][0]
    context = load_config(args.preset).model.max_seq_len
    tokens = args.steps * 2 * args.batch * context
    table = []
    for name, syncs, losses, wall in rows:
        agree = "" if len(losses) == 1 else (" (both volunteers)" if len(set(losses)) == 1 else
                                             f" (volunteers: {' / '.join(f'{x:.4f}' for x in losses)})")
        table.append([name, syncs, f"{losses[0]:.4f}{agree}", f"{losses[0] / baseline:.3f}",
                      f"{100 * (losses[0] / baseline - 1):+.1f}%", f"{wall:.0f}"])
    print(f"\n{args.preset}, {args.steps} steps x {2 * args.batch} sequences x {context} tokens = {tokens:,} "
          f"tokens per run, fp32{''.join(', ' + s for s in shared)}; validation: tinyshakespeare's last 10%, whole; "
          f"{machine()}; "
          f"load average {load_average()}\n")
    print(markdown_table(["setting", "gradients shared", "val loss", "ratio to DDP", "vs DDP", "wall s"], table))


if __name__ == "__main__":
    main()
