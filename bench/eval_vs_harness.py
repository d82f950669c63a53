"""Multiple-choice scoring speed: ours (`commonlm eval --task`'s path) against lm-evaluation-harness's HFLM, on the
same model directory and the same items.

    .venv/bin/python bench/eval_vs_harness.py                       # 6 layers x 384 llama, 200 items per task
    .venv/bin/python bench/eval_vs_harness.py --items 100 --rounds 3 --dtypes fp32 bf16 --layers 12 --width 768

The model is a llama of our Decoder (seeded random weights, untied head) with a byte-level BPE tokenizer trained
on tinyshakespeare, written once by modeldir's writer: ours loads it as `commonlm eval` does (cli._inference_model:
the dtype asked for, bf16 weights packed for oneDNN), the harness reads the same directory with transformers
(HFLM, `dtype` the same, `max_length` the model's context). The items: MMLU zero-shot (four one-letter choices)
and BIG-bench social_iqa zero-shot (three choices of several words), the same `--items` spread over each; the
harness gets them through evaluate/harness.py's task writer (the same prompts, choices and delimiters).

Timed: ours, `score_tasks` on the loaded tasks (encoding, batching, forwards, scoring); theirs, `simple_evaluate`
on the already-built HFLM (reading the written task files, building requests, encoding, forwards, metrics).
Model loading is outside both. Same batch size, same torch thread count. One untimed warm-up of each side, then
`--rounds` rounds alternating the two; items per second is the median round's. The accuracies and every item's
picks are compared (log-likelihoods to 1e-4 nats in fp32; bf16 rounds differently in two implementations, so
there only the count of differing picks is reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table, median, setup_threads  # noqa: E402

from commonlm.config import ModelConfig, RunConfig  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.evaluate.harness import disagreements, write_harness_task  # noqa: E402
from commonlm.evaluate.scoring import score_tasks  # noqa: E402
from commonlm.evaluate.tasks import load_tasks  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.modeldir import save_model_dir  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASKS = ("mmlu", "bigbench:social_iqa")
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build_model(path: Path, layers: int, width: int, vocab: int, context: int) -> int:
    """A seeded random llama with a BPE tokenizer trained on tinyshakespeare, saved by modeldir's writer; its
    parameter count."""
    torch.manual_seed(0)
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer.train_bpe([text[i : i + 4096] for i in range(0, len(text), 4096)], vocab_size=vocab)
    config = RunConfig(model=ModelConfig(family="llama", n_layer=layers, n_head=max(1, width // 64), d_model=width,
                                         vocab_size=tokenizer.vocab_size, max_seq_len=context, tie_embeddings=False))
    model = Decoder(config.model)
    save_model_dir(path, model, tokenizer, config)
    return model.num_params()


def ours_model(model_dir: Path, dtype: str):
    from commonlm.cli import _inference_model

    args = argparse.Namespace(model=str(model_dir), device="cpu", adapter=None, dtype=dtype, quantize=None)
    return _inference_model(args)[0]


def harness_model(model_dir: Path, dtype: str, batch_size: int, context: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype=HF_DTYPES[dtype], max_length=context, batch_size=batch_size,
                device="cpu")


def run_ours(lm, tasks, batch_size: int):
    started = time.perf_counter()
    results = score_tasks(lm.model, lm.tokenizer, tasks, few_shot=0, batch_size=batch_size)
    return time.perf_counter() - started, results


def run_harness(lm, tasks, folder: Path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    written = [write_harness_task(task, folder, few_shot=0) for task in tasks]
    started = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[name for name, _ in written], log_samples=True, bootstrap_iters=0,
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    seconds = time.perf_counter() - started
    from commonlm.evaluate.harness import _result

    return seconds, [_result(task, name, items, out, 0.0) for task, (name, items) in zip(tasks, written)]


def compare(dtype: str, args, model_dir: Path, tasks, tmp: Path) -> list[list[object]]:
    ours_lm = ours_model(model_dir, dtype)
    theirs_lm = harness_model(model_dir, dtype, args.batch_size, args.context)
    warm = [dataclasses.replace(t, items=t.items[:4]) for t in tasks]
    run_ours(ours_lm, warm, args.batch_size)
    run_harness(theirs_lm, warm, tmp / f"warm-{dtype}")
    ours_s, theirs_s = [], []
    for r in range(args.rounds):
        seconds, ours_results = run_ours(ours_lm, tasks, args.batch_size)
        ours_s.append(seconds)
        seconds, theirs_results = run_harness(theirs_lm, tasks, tmp / f"{dtype}-{r}")
        theirs_s.append(seconds)
        print(f"  {dtype} round {r + 1}: ours {ours_s[-1]:.2f} s, harness {theirs_s[-1]:.2f} s", flush=True)
    items = sum(len(t.items) for t in tasks)
    rows = []
    for mine, other in zip(ours_results, theirs_results):
        lines = disagreements(mine, other, args.tolerance if dtype == "fp32" else float("inf"))
        differ = {line.split(": ")[0] for line in lines}  # (each line starts with its item's file:line)
        rows.append([f"{mine.name} ({dtype})", mine.items, f"{mine.metrics['acc']:.4f} / {other.metrics['acc']:.4f}",
                     f"{mine.metrics['acc_norm']:.4f} / {other.metrics['acc_norm']:.4f}", len(differ)])
    ours_rate, theirs_rate = items / median(ours_s), items / median(theirs_s)
    speed = [dtype, items, f"{ours_rate:.1f}", f"{theirs_rate:.1f}", f"{ours_rate / theirs_rate:.2f}x"]
    return [speed, *rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=200, help="items of each task (spread over it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(HF_DTYPES))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--tolerance", type=float, default=1e-4, help="nats, fp32 log-likelihoods")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    setup_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from commonlm.evaluate.tasks import limited

    with tempfile.TemporaryDirectory(prefix="commonlm-bench-eval-") as tmp:
        tmp = Path(tmp)
        params = build_model(tmp / "model", args.layers, args.width, args.vocab, args.context)
        tasks = [t for name in TASKS for t in load_tasks(name, DATA)]
        for task in tasks:
            task.items = limited(task.items, args.items)
        speed, agreement = [], []
        for dtype in args.dtypes:
            first, *rest = compare(dtype, args, tmp / "model", tasks, tmp)
            speed.append(first)
            agreement += rest
    print(f"\nmodel: llama {args.layers} layers x {args.width}, vocabulary {args.vocab}, {params / 1e6:.1f}M "
          f"parameters, context {args.context}; batch size {args.batch_size}; tasks {', '.join(TASKS)} zero-shot")
    print(f"{machine()}; load average {load_average()}; median of {args.rounds} alternating rounds\n")
    print(markdown_table(["dtype", "items", "ours items/s", "harness items/s", "ratio"], speed))
    print()
    print(markdown_table(["task", "items", "acc ours / harness", "acc_norm ours / harness", "items differing"],
                         agreement))


if __name__ == "__main__":
    main()
