"""Context extension, measured: pretrain at a short context, continue at a 4x longer one with scaled RoPE, and check
passkey retrieval (data/passkey.py) before and after.

    .venv/bin/python bench/context_extension.py                      # 256 -> 1024, YaRN x4, plain continuation
    .venv/bin/python bench/context_extension.py --baselines linear   # and linear interpolation as well

Every stage is the real CLI in a subprocess: `tokenizer train --kind byte`, `data prepare` of two passkey corpora
(documents of up to the short and the long context; half of them copy drills, `write_corpus(copies=)`, without which
small models never learned to copy in this budget), `train` of a small llama at the short context (Muon: with AdamW
the same models stayed on the plateau before copying for the whole budget), `train --init
BASE --set model.max_seq_len=LONG model.rope_scaling=yarn model.rope_factor=4` on the long documents, and `eval
--task passkey:LEN` (greedy, exact match on the five digits; chance is ~0). Beside the trained models the table
shows the base model stretched without training (plain RoPE at positions it never saw; YaRN applied zero-shot), made
with the same `continued_model` that `train --init` uses. A length beyond a model's context is refused by the task
("-"). Validation loss is on the long corpus's validation split in windows of the model's own context (the
base's is on shorter windows, so it is not comparable). Wall seconds: each training run's, setup included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import load_average, machine, markdown_table  # noqa: E402

from commonlm.config import RunConfig  # noqa: E402
from commonlm.data.loader import TokenData  # noqa: E402
from commonlm.data.passkey import write_corpus  # noqa: E402
from commonlm.evaluate.evaluate import evaluate  # noqa: E402
from commonlm.modeldir import load_model_dir, save_model_dir  # noqa: E402
from commonlm.train.extend import continued_model  # noqa: E402

CLI = [sys.executable, "-m", "commonlm"]


def commonlm(*args: object) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if proc.returncode not in (0, 2):
        sys.exit(f"commonlm {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def train(out: Path, data: Path, sets: list[str], seconds: float, steps: int, threads: int,
          init: Path | None = None) -> float:
    budget = [f"train.max_time={seconds}", f"train.max_steps={steps}", "train.eval_every=250",
              "train.eval_tokens=32768", "train.ckpt_every=0", "train.log_every=25", f"train.threads={threads}",
              "train.dtype=fp32"]
    start = ["--init", init] if init else ["--config", "tiny"]
    t0 = time.perf_counter()
    proc = commonlm("train", *start, "--data", data, "--out", out, "--set", *sets, *budget)
    if proc.returncode:
        sys.exit(proc.stderr)
    return time.perf_counter() - t0


def passkey_accuracy(model: Path, length: int, limit: int, work: Path) -> str:
    report = work / f"{model.parent.name if model.name == 'final' else model.name}-{length}.json"
    proc = commonlm("eval", model, "--task", f"passkey:{length}", "--limit", limit, "--json", report)
    if proc.returncode:  # a prompt longer than the model's context: refused
        return "-"
    return f"{json.loads(report.read_text())[0]['acc']:.2f}"


def stretched(base: Path, out: Path, long: int, scaling: str, factor: float) -> Path:
    """The base model with a longer context and no training (what `train --init` starts from)."""
    model, tokenizer, config = load_model_dir(base)
    asked = dataclasses.replace(config.model, max_seq_len=long, rope_scaling=scaling, rope_factor=factor)
    model = continued_model(model, asked, base, torch.device("cpu"))
    save_model_dir(out, model, tokenizer, RunConfig(model=model.config, train=config.train))
    return out


def val_loss(model_dir: Path, data: Path, tokens: int) -> str:
    model, _, _ = load_model_dir(model_dir)
    return f"{evaluate(model.eval(), TokenData(data), model.config.max_seq_len, max_tokens=tokens).loss:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/context_extension"), help="where runs and data go")
    ap.add_argument("--short", type=int, default=256, help="the pretraining context")
    ap.add_argument("--factor", type=int, default=4, help="the longer context is this many times the short one")
    ap.add_argument("--base-seconds", type=float, default=900, help="pretraining wall time")
    ap.add_argument("--base-steps", type=int, default=2000, help="pretraining steps (the schedule's length)")
    ap.add_argument("--extend-seconds", type=float, default=300, help="wall time of each continuation")
    ap.add_argument("--extend-steps", type=int, default=500, help="steps of each continuation")
    ap.add_argument("--baselines", nargs="*", default=["none"], choices=["none", "linear", "dynamic", "llama3"],
                    help="continuations besides YaRN (none: plain continuation without scaling)")
    ap.add_argument("--threads", type=int, default=1, help="training threads (on a loaded 2-core box one thread "
                    "trained 2.5x faster than two: the second thread's OpenMP barriers wait on a busy core)")
    ap.add_argument("--batch", type=int, default=16, help="the base's micro-batch (sequences of the short context)")
    ap.add_argument("--limit", type=int, default=22, help="passkey items per length (depths spread 0..1)")
    ap.add_argument("--model", nargs="*", default=["model.n_layer=2", "model.d_model=128", "model.n_head=4"],
                    help="--set model.* of the base")
    ap.add_argument("--copies", type=float, default=0.5, help="share of copy drills among the corpora's documents")
    ap.add_argument("--optimizer", default="muon", choices=["muon", "adamw"], help="of every training run")
    ap.add_argument("--seed", type=int, default=7, help="train.seed of every training run")
    args = ap.parse_args()
    short, long = args.short, args.short * args.factor
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(f"# context_extension · {machine()} · load {load_average()}\n", flush=True)

    write_corpus(work / "short.jsonl", 40000, short, seed=0, copies=args.copies)
    write_corpus(work / "long.jsonl", 10000, long, seed=1, copies=args.copies)
    commonlm("tokenizer", "train", "--kind", "byte", "--input", work / "short.jsonl", "--out", work / "tok",
             "--overwrite")
    for name in ("short", "long"):
        if not (work / name / "index.json").is_file():
            commonlm("data", "prepare", "--input", work / f"{name}.jsonl", "--tokenizer", work / "tok", "--out",
                     work / name, "--val-fraction", 0.02, "--workers", 1)

    rows = []
    lengths = [short, 2 * short, long] if args.factor >= 2 else [short, long]
    common = [f"train.optimizer={args.optimizer}", f"train.seed={args.seed}", "train.schedule=cosine"]
    base_sets = [f"model.max_seq_len={short}", *args.model, f"train.micro_batch_size={args.batch}", "train.lr=3e-3",
                 "train.warmup_steps=30", *common]
    base_seconds = train(work / "base", work / "short", base_sets, args.base_seconds, args.base_steps, args.threads)
    base = work / "base" / "final"

    def row(name: str, model: Path, trained: str, scaling: str, seconds: float | None) -> None:
        accuracy = [passkey_accuracy(model, n, args.limit, work) for n in lengths]
        loss = val_loss(model, work / "long", 65536) if load_model_dir(model)[2].model.max_seq_len >= long else "-"
        rows.append([name, trained, scaling, *accuracy, loss, "-" if seconds is None else f"{seconds:.0f}"])
        print(markdown_table(header, rows[-1:]).splitlines()[-1], flush=True)

    header = ["model", "context trained", "RoPE scaling", *[f"passkey@{n}" for n in lengths],
              f"val loss@{long}", "wall s"]
    print(markdown_table(header, []), flush=True)
    row("base", base, str(short), "none", base_seconds)
    row("base, context stretched, no training", stretched(base, work / "plain0", long, "none", 1.0), "-", "none",
        None)
    row("base, YaRN zero-shot", stretched(base, work / "yarn0", long, "yarn", args.factor), "-",
        f"yarn x{args.factor}", None)
    for scaling in ["yarn", *args.baselines]:
        factor = 1 if scaling == "none" else args.factor
        sets = [f"model.max_seq_len={long}", f"model.rope_scaling={scaling}", f"model.rope_factor={factor}",
                f"train.micro_batch_size={max(1, args.batch // args.factor)}", "train.lr=1e-3", "train.warmup_steps=20",
                *common]
        seconds = train(work / f"ext-{scaling}", work / "long", sets, args.extend_seconds, args.extend_steps,
                        args.threads, base)
        label = "none (plain continuation)" if scaling == "none" else f"{scaling} x{factor}"
        row(f"continued at {long}", work / f"ext-{scaling}" / "final", f"{short} then {long}", label, seconds)
    print(f"\ncorpora: {args.copies:g} copy drills; base: {' '.join(base_sets)}, {args.base_seconds:g} s or "
          f"{args.base_steps} steps; continuations: "
          f"micro-batch {max(1, args.batch // args.factor)} x {long} tokens, lr 1e-3, {args.extend_seconds:g} s or "
          f"{args.extend_steps} steps; "
          f"passkey: {args.limit} items per length · load {load_average()}")


if __name__ == "__main__":
    main()
