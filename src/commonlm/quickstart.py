"""`commonlm quickstart` (what `make demo` runs): the whole spine on this machine, no download.

Corpus: this Python's own standard library. Steps: train a BPE tokenizer, prepare token shards,
train the `quickstart` preset (Llama-style) for a fixed time budget, then report validation loss and
bits per byte before and after, and print a few samples. Everything lands under `runs/quickstart/`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from commonlm.config import load_config
from commonlm.errors import UserError
from commonlm.utils import console

PROMPTS = ["def", "class", "import"]
SAMPLING = {"max_tokens": 120, "temperature": 0.7, "top_k": 40}  # sample i is drawn with seed=i


def quickstart(out: str | Path = "runs/quickstart", train_seconds: float = 240.0, overwrite: bool = False,
               vocab_size: int = 4096, max_steps: int | None = None) -> dict:
    """Run the four steps; `max_steps` (instead of the time budget) makes a run reproducible."""
    from commonlm.api import load
    from commonlm.data.prepare import prepare
    from commonlm.data.sources import iter_texts
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.train.metrics import read_metrics
    from commonlm.train.trainer import train

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists from an earlier quickstart; pass --overwrite to replace it")
        shutil.rmtree(out)
    t0 = time.perf_counter()

    console.rule("[bold]1/4 tokenizer[/]: byte-level BPE on the Python standard library")
    tok = Tokenizer.train_bpe(iter_texts(["stdlib"]), vocab_size=vocab_size)
    tok.save(out / "tokenizer")
    console.print(f"{tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s → {out / 'tokenizer'}")

    console.rule("[bold]2/4 data[/]: tokenize into shards (2% of files held out for validation)")
    prepare(["stdlib"], out / "tokenizer", out / "data", val_fraction=0.02)

    budget = [f"train.max_steps={max_steps}"] if max_steps else [f"train.max_time={train_seconds}"]
    console.rule(f"[bold]3/4 train[/]: quickstart preset for {budget[0].split('.')[1]}")
    config = load_config("quickstart", budget + ["train.eval_every=200"])
    config.data.path = str(out / "data")
    result = train(config, out / "run")
    if result.stopped_because == "signal":  # Ctrl-C: a checkpoint was saved, there is no final model to report on
        return {"steps": result.step, "final_dir": None, "exit_status": result.exit_status}
    evals = [r for r in read_metrics(out / "run") if "val_loss" in r]
    before, after = evals[0], evals[-1]

    console.rule("[bold]4/4 results[/]")
    console.print(f"validation loss   {before['val_loss']:.3f} → {after['val_loss']:.3f} nats/token")
    console.print(f"bits per byte     {before['val_bpb']:.3f} → {after['val_bpb']:.3f}")
    console.print(f"steps {result.step}, loss curve {out / 'run' / 'loss.png'}, model {result.final_dir}")
    model = load(result.final_dir)
    for i, prompt in enumerate(PROMPTS):
        console.rule(f"sample {i + 1}", style="dim")
        print(prompt + model.generate(prompt, seed=i, **SAMPLING), flush=True)
    console.rule()
    console.print(f"done in {time.perf_counter() - t0:.0f}s. Try: commonlm generate {out / 'run'} --prompt 'def '")
    return {"before": before, "after": after, "steps": result.step, "final_dir": result.final_dir, "exit_status": 0}
