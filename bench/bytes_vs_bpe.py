"""Byte-level against BPE at equal training compute: validation bits per byte on the same held-out text.

    .venv/bin/python bench/bytes_vs_bpe.py                          # the bytes-cpu preset's budget, BPE 1024
    .venv/bin/python bench/bytes_vs_bpe.py --flops 2e12 --vocab-size 4096       # a smaller budget, BPE 4096

Everything runs through the CLI as a user runs it. Text: tinyshakespeare split as nanoGPT splits it (the first
int(0.9 n) bytes train, the rest is the held-out text). Each tokenizer is trained on the train text only
(`tokenizer train --kind byte`, and `tokenizer train --vocab-size V` for byte-level BPE); each prepares the train
text and, separately, the held-out text (`data prepare --val-fraction 0`: all of it in one split, so both models
are scored on exactly the same bytes; the script checks the byte counts agree).

The two models are the bytes-cpu preset (`commonlm train --config bytes-cpu`) and the same model (width, depth,
heads, batch, learning rate and schedule) with the BPE tokenizer and a context of the preset's divided by
--context-ratio (default 4: about the same text per window). Equal compute is equal training FLOPs, as the loop
counts them (`flops_per_token`: 6 per matmul weight, the head included, plus attention, at the run's context):
each model gets max_steps = budget / (flops_per_token * tokens per step). The default budget is the preset's own
(its max_steps), so the byte model is the preset as shipped. Then `commonlm eval --data HELD_OUT --split train`
gives each model's bits per byte over every held-out byte (non-overlapping windows of its context). Wall time is
the `commonlm train` process's (setup, training, its final model directory); tokens/s is the loop's median over
its log steps; bytes/s is that times the train text's bytes per token. Ratios are against BPE.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import load_average, machine, markdown_table  # noqa: E402
from cpu_speedrun import DATA, run_cli  # noqa: E402

from commonlm.config import load_config  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402

PRESET = "bytes-cpu"


def split_text(text: Path, work: Path) -> tuple[Path, Path]:
    """nanoGPT's split: the first int(0.9 n) bytes to train.txt, the rest to heldout.txt."""
    raw = text.read_bytes()
    n_train = int(0.9 * len(raw))
    (work / "train.txt").write_bytes(raw[:n_train])
    (work / "heldout.txt").write_bytes(raw[n_train:])
    return work / "train.txt", work / "heldout.txt"


def prepare(kind: str, vocab_size: int, train_text: Path, heldout: Path, work: Path) -> tuple[Path, Path]:
    """One tokenizer trained on the train text; (train data, held-out data) prepared with it."""
    tok = work / f"tok-{kind}"
    how = ["--kind", "byte"] if kind == "bytes" else ["--vocab-size", str(vocab_size)]
    run_cli(["tokenizer", "train", *how, "--input", str(train_text), "--out", str(tok)], work / f"tok-{kind}.log")
    dirs = []
    for name, text in (("train", train_text), ("heldout", heldout)):
        out = work / f"{name}-{kind}"
        run_cli(["data", "prepare", "--input", str(text), "--tokenizer", str(tok), "--out", str(out),
                 "--val-fraction", "0"], work / f"{name}-{kind}.log")
        dirs.append(out)
    return dirs[0], dirs[1]


def split_info(data: Path) -> dict:
    return json.loads((data / "index.json").read_text())["splits"]["train"]


def flops_per_token(overrides: list[str], vocab: int) -> tuple[float, int, int]:
    """(the loop's training FLOPs per token, tokens per step, the preset's max_steps) for the preset with these
    overrides, at its vocabulary or (model.vocab_size=0) this one rounded up to 64 as `train` rounds it."""
    config = load_config(PRESET, overrides)
    config.model.vocab_size = config.model.vocab_size or -(-vocab // 64) * 64
    with torch.device("meta"):
        per_token = Decoder(config.model).flops_per_token(config.model.max_seq_len)
    return per_token, config.train.micro_batch_size * config.model.max_seq_len, config.train.max_steps


def train_and_eval(name: str, train_data: Path, heldout: Path, overrides: list[str], steps: int, work: Path) -> dict:
    out = work / f"run-{name}"
    sets = [*overrides, f"train.max_steps={steps}", "train.eval_every=0", "train.ckpt_every=0",
            "train.target_val_loss=0"]
    _, wall = run_cli(["train", "--config", PRESET, "--data", str(train_data), "--out", str(out),
                       *[a for s in sets for a in ("--set", s)]], work / f"run-{name}.log")
    eval_log = work / f"eval-{name}.log"
    run_cli(["eval", str(out), "--data", str(heldout), "--split", "train"], eval_log)
    found = re.search(r"loss ([\d.]+) .* bits/byte ([\d.]+) · ([\d,]+) tokens", eval_log.read_text())
    if not found:
        raise SystemExit(f"bytes_vs_bpe: no result in {eval_log}")
    logged = [r for r in read_metrics(out) if "tok_per_s" in r]
    return {"name": name, "steps": steps, "wall": wall, "tok_s": statistics.median(r["tok_per_s"] for r in logged),
            "tokens": logged[-1]["tokens"], "loss": float(found.group(1)), "bpb": float(found.group(2)),
            "eval_tokens": int(found.group(3).replace(",", ""))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help=f"tinyshakespeare.txt (default: {DATA})")
    ap.add_argument("--vocab-size", type=int, default=1024, help="the BPE tokenizer's size")
    ap.add_argument("--context-ratio", type=int, default=4, help="the byte model's context over the BPE model's")
    ap.add_argument("--flops", type=float, default=0.0, help="training FLOPs of each model (0: the preset's own)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="more overrides for both models, as for `commonlm train --set`")
    ap.add_argument("--work", type=Path, default=None, help="keep the data and runs here (default: a temporary dir)")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"bytes_vs_bpe: {args.data} not found; pass --data PATH to tinyshakespeare.txt")
    if args.work is not None and args.work.exists():
        raise SystemExit(f"bytes_vs_bpe: --work {args.work} already exists; choose a new directory")
    context = load_config(PRESET, args.set).model.max_seq_len
    if context % args.context_ratio:
        raise SystemExit(f"bytes_vs_bpe: the preset's context {context} is not divisible by --context-ratio "
                         f"{args.context_ratio}")

    with tempfile.TemporaryDirectory(prefix="bytes_vs_bpe-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_text, heldout = split_text(args.data, work)
        data = {kind: prepare(kind, args.vocab_size, train_text, heldout, work) for kind in ("bytes", "bpe")}
        held = {kind: split_info(heldout_data) for kind, (_, heldout_data) in data.items()}
        if held["bytes"]["bytes"] != held["bpe"]["bytes"] or held["bytes"]["bytes"] != heldout.stat().st_size:
            raise SystemExit(f"bytes_vs_bpe: the held-out splits differ ({held['bytes']['bytes']:,} and "
                             f"{held['bpe']['bytes']:,} bytes of {heldout.stat().st_size:,})")
        vocab = {kind: json.loads((d[0] / "index.json").read_text())["vocab_size"] for kind, d in data.items()}
        overrides = {"bytes": list(args.set), "bpe": [*args.set, f"model.max_seq_len={context // args.context_ratio}",
                                                      "model.vocab_size=0"]}  # (the preset's 320 is the bytes')
        counts = {kind: flops_per_token(overrides[kind], vocab[kind]) for kind in data}
        budget = args.flops or counts["bytes"][0] * counts["bytes"][1] * counts["bytes"][2]
        print(f"# bytes_vs_bpe · {machine()} · load {load_average()}\n\ntinyshakespeare, nanoGPT's split; "
              f"{budget:.3g} training FLOPs each; byte-level context {context}, BPE {vocab['bpe']} context "
              f"{context // args.context_ratio}; `commonlm train --config {PRESET}` {' '.join(args.set)}", flush=True)
        results = []
        for kind in ("bpe", "bytes"):
            per_token, per_step, _ = counts[kind]
            steps = max(1, round(budget / (per_token * per_step)))
            r = train_and_eval(kind, data[kind][0], data[kind][1], overrides[kind], steps, work)
            info = split_info(data[kind][0])
            r |= {"flops": per_token * r["tokens"], "per_token": per_token,
                  "bytes_per_token": info["bytes"] / info["tokens"]}
            results.append(r)
            print(f"{kind}: {steps} steps, {r['wall']:.0f} s, held-out bpb {r['bpb']:.4f} · load {load_average()}",
                  flush=True)
    base = results[0]
    rows = [[r["name"] if r["name"] == "bytes" else f"BPE {vocab['bpe']}", f"{r['bytes_per_token']:.2f}",
             f"{r['per_token'] / 1e6:.2f}M", r["steps"], f"{r['flops']:.3g}", f"{r['bpb']:.4f}",
             f"{r['bpb'] / base['bpb']:.3f}x", f"{r['tok_s']:,.0f}", f"{r['tok_s'] * r['bytes_per_token']:,.0f}",
             f"{r['tok_s'] * r['bytes_per_token'] / (base['tok_s'] * base['bytes_per_token']):.2f}x",
             f"{r['wall']:.0f}", f"{r['wall'] / base['wall']:.2f}x"] for r in results]
    print()
    print(markdown_table(["tokenizer", "bytes/token", "train FLOPs/token", "steps", "train FLOPs",
                          "held-out bits/byte", "vs BPE", "tok/s", "bytes/s", "vs BPE", "train wall s", "vs BPE"],
                         rows))
    print(f"\nheld-out text: {held['bytes']['bytes']:,} bytes ({results[1]['eval_tokens']:,} byte tokens, "
          f"{results[0]['eval_tokens']:,} BPE tokens) · load {load_average()}")


if __name__ == "__main__":
    main()
