"""Training steps when other processes share the CPU: torch threads 1 or all cores, OpenMP wait policy.

    .venv/bin/python bench/contention.py [--preset nanogpt-cpu] [--loads 0,1,2] [--rounds 2] [--pin]

The competing load is N busy-loop processes (`while True: pass`; with --pin, the first on the last core, the
next on the one before). For each load, each setting runs in a fresh process (OpenMP reads OMP_WAIT_POLICY once,
at start), `rounds` times, the settings alternating so that a change of load hits them alike. A process times
`steps` training steps of the preset after `warmup` untimed ones: the trainer's step (bench/train_throughput.py)
on random tokens. The table gives the median ms/step of each setting and its speed against the old default
(torch threads = all cores, the default wait policy) measured under the same load in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LOADS = {  # a busy loop, or another PyTorch process doing small matmuls on all cores (as a second training run)
    "busy": "while True: pass",
    "torch": "import torch\nx = torch.randn(256, 256)\nwhile True: (x @ x).relu_()",
}
OLD_DEFAULT = "all cores"


def settings(cores: int) -> dict[str, tuple[int | None, dict[str, str]]]:
    """label -> (torch threads, OpenMP environment); threads None: what `commonlm train` picks (its
    ThreadGovernor, commonlm/threads.py). OpenMP (libgomp in PyTorch's wheels) spins this long at a barrier before
    it sleeps: GOMP_SPINCOUNT, by default 300,000 iterations; OMP_WAIT_POLICY=PASSIVE makes it 0."""
    return {
        OLD_DEFAULT: (cores, {}),
        "1 thread": (1, {}),
        "all cores + passive": (cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "1 thread + passive": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "all cores + spin 10k": (cores, {"GOMP_SPINCOUNT": "10000"}),
        "all cores + spin 1k": (cores, {"GOMP_SPINCOUNT": "1000"}),
        "commonlm default": (None, {}),
    }


def child(preset: str, threads: int | None, steps: int, warmup: int) -> None:
    import torch
    from common import median, time_steps
    from train_throughput import our_step, preset_config

    from commonlm.runtime import pick_dtype
    from commonlm.threads import ThreadGovernor, available_cpus

    governor = ThreadGovernor(available_cpus()) if threads is None else None  # as the trainer does
    torch.set_num_threads(governor.cap if governor else threads)
    device = torch.device("cpu")
    config, batch, seq = preset_config(preset, device)
    step, _, _ = our_step(config, batch, seq, device, pick_dtype("auto", device), compile=False)
    if governor is not None:
        governor.update(force=True)
        train_step = step

        def step() -> None:
            train_step()
            governor.update()

    times = time_steps(step, warmup, steps, device)
    print(json.dumps({"ms": 1e3 * median(times), "tokens": batch * seq, "threads": torch.get_num_threads()}))


def start_load(n: int, kind: str, pin: bool, cores: int) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        core = {cores - 1 - i % cores} if pin else None
        procs.append(subprocess.Popen([sys.executable, "-c", LOADS[kind]],
                                      preexec_fn=(lambda c=core: os.sched_setaffinity(0, c)) if core else None))
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nanogpt-cpu")
    ap.add_argument("--loads", default="0,1,2", help="numbers of busy-loop processes, comma-separated")
    ap.add_argument("--load-kind", choices=list(LOADS), default="busy")
    ap.add_argument("--pin", action="store_true", help="pin each load process to one core")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settings", help="labels to run, comma-separated (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    table = settings(cores)
    if args.child:
        return child(args.preset, table[args.child][0], args.steps, args.warmup)
    labels = args.settings.split(",") if args.settings else list(table)
    unknown = set(labels) - set(table)
    if unknown or OLD_DEFAULT not in labels:
        ap.error(f"--settings: choose from {', '.join(table)}; '{OLD_DEFAULT}' is needed for the ratios")
    loads = [int(n) for n in args.loads.split(",")]

    from common import load_average, machine, markdown_table

    print(f"# contention · {machine()} · preset {args.preset} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: dict[tuple[int, str], list[float]] = {}
    chosen: dict[tuple[int, str], set[int]] = {}  # the thread counts the processes ended with
    for n in loads:
        procs = start_load(n, args.load_kind, args.pin, cores)
        try:
            time.sleep(3 if n else 0)  # the load is running (a torch load imports torch first)
            before = load_average()
            for _ in range(args.rounds):
                for label in labels:
                    omp = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                    env = {**omp, "THP_MEM_ALLOC_ENABLE": "1", **table[label][1]}
                    out = subprocess.run([sys.executable, __file__, "--child", label, "--preset", args.preset,
                                          "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                         env=env, check=True, capture_output=True, text=True).stdout
                    record = json.loads(out.strip().splitlines()[-1])
                    results.setdefault((n, label), []).append(record["ms"])
                    chosen.setdefault((n, label), set()).add(record["threads"])
            print(f"load {n}: load average {before} -> {load_average()}", file=sys.stderr)
        finally:
            for p in procs:
                p.kill()
                p.wait()

    what = {n: f"{n} {args.load_kind}{' (pinned)' if args.pin and n else ''}" for n in loads}
    header = ["setting"] + [f"{what[n]}: ms/step" for n in loads] + [f"vs old default, {what[n]}" for n in loads]
    rows = []
    for label in labels:
        ms = [statistics.median(results[(n, label)]) for n in loads]
        base = [statistics.median(results[(n, OLD_DEFAULT)]) for n in loads]
        spread = [f"{m:.1f} ({min(results[(n, label)]):.0f}–{max(results[(n, label)]):.0f})"
                  + (f" [{'/'.join(map(str, sorted(chosen[(n, label)])))} thr.]" if table[label][0] is None else "")
                  for n, m in zip(loads, ms)]
        rows.append([label] + spread + [f"{b / m:.2f}×" for b, m in zip(base, ms)])
    print()
    print(markdown_table(header, rows))
    print(f"\nmedian over {args.rounds} processes (min–max of their medians), {args.steps} timed steps each; "
          f"{cores} cores available; [n thr.]: the threads `commonlm default` chose")


if __name__ == "__main__":
    main()
