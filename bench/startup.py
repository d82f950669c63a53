"""Start-up cost of `commonlm` commands: each one a fresh process, timed from its start.

    .venv/bin/python bench/startup.py [--rounds 3] [--load 0] [--before OLD_CHECKOUT]

Commands: `--help`, `presets`, `train` of the tiny and the quickstart presets (seconds to the first logged step, and
to the end after one step), `generate` of 16 tokens from a tiny random model. The first round of a checkout that
remembers the measured matmul peak (train/metrics.py `peak_flops`) measures it; the later rounds read it.
With --before, the same commands also run from another checkout's `src/` (PYTHONPATH), alternating with this one,
so that a change is measured against what came before under the same load. --load N starts N competing
processes (bench/contention.py's LOADS) for the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contention import LOADS, start_load  # noqa: E402


def prepare(root: Path) -> tuple[Path, Path]:
    """A prepared byte-level corpus and a tiny random model directory (made with this checkout)."""
    import random

    import torch

    from commonlm.config import ModelConfig, RunConfig
    from commonlm.data.prepare import prepare as prepare_data
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.model.decoder import Decoder
    from commonlm.modeldir import save_model_dir

    rng = random.Random(0)
    words = "the model reads text and learns to predict the next token def class return import".split()
    (root / "corpus").mkdir(parents=True)
    for i in range(60):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(10))
        (root / "corpus" / f"{i}.txt").write_text(text)
    tok = Tokenizer.byte_level()
    tok.save(root / "tok")
    prepare_data([str(root / "corpus")], root / "tok", root / "data", val_fraction=0.1, workers=1, progress=False)
    torch.manual_seed(0)
    config = ModelConfig(family="llama", n_layer=2, n_head=4, d_model=64, vocab_size=320, max_seq_len=128)
    save_model_dir(root / "model", Decoder(config), tok, RunConfig(model=config))
    return root / "data", root / "model"


def time_command(args: list[str], env: dict[str, str], first_step: Path | None = None) -> dict[str, float]:
    """Seconds until the process ends (and until `first_step`, a metrics.jsonl, holds a loss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "commonlm", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = {}
    try:
        while proc.poll() is None:
            if first_step is not None and "first" not in seen and first_step.exists() \
                    and '"loss"' in first_step.read_text():
                seen["first"] = time.perf_counter() - t0
            time.sleep(0.01)
        seen["end"] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"commonlm {' '.join(args)}: exit {proc.returncode}\n{proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.wait()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", type=int, default=0, help="competing processes during the whole run")
    ap.add_argument("--load-kind", choices=list(LOADS), default="busy")
    ap.add_argument("--before", help="another checkout (its src/ is used through PYTHONPATH) to compare with")
    args = ap.parse_args()

    from common import load_average, machine, markdown_table

    print(f"# startup · {machine()} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · load {load_average()}")
    versions = {"this checkout": dict(os.environ)}  # (with PYTHONPATH as given: another checkout's src/ may stand in)
    if args.before:
        versions = {"before": {**versions["this checkout"], "PYTHONPATH": str(Path(args.before) / "src")},
                    **versions}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, model = prepare(root)
        for env in versions.values():
            env["COMMONLM_CACHE_DIR"] = str(root / "cache")  # a fresh cache, shared by the rounds
        commands = {
            "--help": lambda run: (["--help"], None),
            "presets": lambda run: (["presets"], None),
            "train tiny, 1 step": lambda run: (["train", "--config", "tiny", "--data", str(data), "--out", str(run),
                                                "--set", "train.max_steps=1", "--set", "train.log_every=1"],
                                               run / "metrics.jsonl"),
            "train quickstart preset, 1 step": lambda run: (
                ["train", "--config", "quickstart", "--data", str(data), "--out", str(run),
                 "--set", "train.max_steps=1", "--set", "train.log_every=1"], run / "metrics.jsonl"),
            "generate 16 tokens": lambda run: (["generate", str(model), "--prompt", "def ", "--max-tokens", "16",
                                                "--seed", "0"], None),
        }
        times: dict[tuple[str, str, str], list[float]] = {}
        loads = start_load(args.load, args.load_kind, False, len(os.sched_getaffinity(0)))
        try:
            for r in range(args.rounds):
                for name, make in commands.items():
                    for version, env in versions.items():  # alternate: a change of load hits both alike
                        cmd, first = make(root / "runs" / f"{name}-{version}-{r}".replace(" ", "_"))
                        for what, seconds in time_command(cmd, env, first).items():
                            times.setdefault((name, what, version), []).append(seconds)
                print(f"round {r + 1}/{args.rounds} · load {load_average()}", file=sys.stderr)
        finally:
            for p in loads:
                p.kill()
                p.wait()

    rows = []
    for name in commands:
        for what in ("first", "end"):
            if (name, what, "this checkout") not in times:
                continue
            cells = []
            for version in versions:
                t = times[(name, what, version)]
                cells.append(f"{statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f})")
            label = f"{name}: {'to the first step' if what == 'first' else 'whole command'}"
            ratio = []
            if args.before:
                b, a = (statistics.median(times[(name, what, v)]) for v in versions)
                ratio = [f"{b / a:.2f}×"]
            rows.append([label, *cells, *ratio])
    header = ["command", *[f"{v}: s, median (min–max)" for v in versions]] + (["speed-up"] if args.before else [])
    print()
    print(markdown_table(header, rows))
    print(f"\n{args.rounds} rounds, {args.load} competing {args.load_kind} process(es); load {load_average()}")
    print(json.dumps({f"{k[0]}|{k[1]}|{k[2]}": v for k, v in times.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
