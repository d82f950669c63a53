"""CPU speedrun: wall time of `commonlm train --config speedrun-cpu` to validation loss <= 1.88 on tinyshakespeare.

    .venv/bin/python bench/cpu_speedrun.py                                  # 3 runs of the preset, median wall
    .venv/bin/python bench/cpu_speedrun.py --data PATH/tinyshakespeare.txt --runs 1 --set train.lr=2e-3

Everything that trains is the product, run as a user runs it: the script prepares the data once with the CLI
(`tokenizer train --kind byte`, `data prepare`), then times whole `commonlm train` processes: Python start, setup,
training, the evaluations, the final checkpoint and model directory. The preset evaluates the whole validation
split (train.eval_tokens=0: the mean next-byte cross-entropy over every byte, in non-overlapping windows of the
context) every train.eval_every steps and stops at the first evaluation with loss <= train.target_val_loss.

Split: nanoGPT's, the first int(0.9 n) bytes train and the rest validate. `data prepare` appends an end-of-text
token to the file (one document) and holds out the last share of its tokens; the --val-fraction passed here makes
that share exactly nanoGPT's validation bytes plus that end-of-text token (one more prediction, 111,540 instead of
111,539), and the script checks that the train split is the file's first int(0.9 n) bytes.

The data defaults to ../shared/data/tinyshakespeare.txt beside the repository.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table  # noqa: E402

from commonlm.data.loader import TokenData  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
COMMONLM = [sys.executable, "-m", "commonlm"]


def run_cli(args: list[str], log: Path) -> tuple[float, float]:
    """Run `commonlm ARGS` with its output in `log`; (unix start time, wall seconds). Exits with the log's tail on
    failure."""
    with open(log, "w") as sink:
        start, t0 = time.time(), time.perf_counter()
        env = os.environ | {"COLUMNS": "200"}  # the closing line unwrapped
        done = subprocess.run(COMMONLM + args, stdout=sink, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"cpu_speedrun: `commonlm {' '.join(args[:2])}` failed ({done.returncode}): {tail[0]}")
    return start, wall


def prepare(text: Path, work: Path) -> Path:
    """Byte tokenizer and token shards with nanoGPT's split (see the module docstring); returns the data directory."""
    n = text.stat().st_size
    n_train = int(0.9 * n)
    val_fraction = (n - n_train + 1) / (n + 1)  # of n bytes + 1 end-of-text token: nanoGPT's val bytes + that token
    run_cli(["tokenizer", "train", "--kind", "byte", "--input", str(text), "--out", str(work / "tok")],
            work / "tokenizer.log")
    run_cli(["data", "prepare", "--input", str(text), "--tokenizer", str(work / "tok"), "--out", str(work / "data"),
             "--val-fraction", repr(val_fraction)], work / "prepare.log")
    data = TokenData(work / "data")
    head = np.frombuffer(text.read_bytes()[:n_train], np.uint8)
    if data.tokens("train") != n_train or not np.array_equal(data.read("train", 0, n_train), head):
        raise SystemExit(f"cpu_speedrun: the train split of {work / 'data'} is not the first {n_train:,} bytes of "
                         f"{text} (its hash sent it to validation, or cleaning changed bytes: a BOM, non-NFC text)")
    return work / "data"


def train_once(data: Path, out: Path, target: float, overrides: list[str]) -> dict:
    """One timed `commonlm train` process; what it reached, read from its metrics.jsonl and closing line."""
    start, wall = run_cli(["train", "--config", "speedrun-cpu", "--data", str(data), "--out", str(out),
                           "--set", f"train.target_val_loss={target}", *overrides], out.parent / f"{out.name}.log")
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    if not evals:
        raise SystemExit(f"cpu_speedrun: {out} evaluated nothing (train.eval_every and the data's val split?)")
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    log = (out.parent / f"{out.name}.log").read_text()
    threads = re.search(r"(\d+) threads", log)  # the trainer's choice (train.threads=0: the CPUs left free)
    return {"wall": wall, "to_target": hit["time"] - start if hit else None, "steps": evals[-1]["step"],
            "val": evals[-1]["val_loss"], "evals": len(evals), "closing": log.strip().splitlines()[-1],
            "threads": threads.group(1) if threads else "?"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help=f"tinyshakespeare.txt (default: {DATA})")
    ap.add_argument("--target", type=float, default=1.88, help="validation loss to reach (train.target_val_loss)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="more overrides for every run, as for `commonlm train --set`")
    ap.add_argument("--work", type=Path, default=None, help="keep the data and runs here (default: a temporary dir)")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"cpu_speedrun: {args.data} not found; pass --data PATH to tinyshakespeare.txt")
    if args.runs < 1:
        raise SystemExit(f"cpu_speedrun: --runs {args.runs} must be at least 1")
    if args.work is not None and args.work.exists():
        raise SystemExit(f"cpu_speedrun: --work {args.work} already exists; choose a new directory")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="cpu_speedrun-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        data = prepare(args.data, work)
        print(f"# cpu_speedrun · {machine()} · load {load_average()}\n"
              f"data {args.data} prepared in {time.perf_counter() - t0:.2f} s · `commonlm train --config speedrun-cpu "
              f"--set train.target_val_loss={args.target} {' '.join(args.set)}`", flush=True)
        rows, walls, reached = [], [], 0
        for i in range(1, args.runs + 1):
            r = train_once(data, work / f"run{i}", args.target, ["--set", *args.set] if args.set else [])
            walls.append(r["wall"])
            reached += r["to_target"] is not None
            to_target = f"{r['to_target']:.2f}" if r["to_target"] is not None else "not reached"
            rows.append([i, r["threads"], r["steps"], f"{r['val']:.4f}", r["evals"], to_target, f"{r['wall']:.2f}"])
            print(f"run {i}: {r['closing']} · wall {r['wall']:.2f} s · load {load_average()}", flush=True)
    print()
    header = ["run", "threads", "steps", "final val loss", "evals", f"s to ≤{args.target:g} from process start",
              "wall s (process)"]
    print(markdown_table(header, rows))
    print(f"\nmedian wall of {args.runs}: **{statistics.median(walls):.2f} s** · load {load_average()}")
    if reached < args.runs:
        sys.exit(1)


if __name__ == "__main__":
    main()
