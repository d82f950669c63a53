"""Multiple-choice scoring speed: ours (`commonlm eval --task`'s path) against lm-evaluation-harness's HFLM, on the
same model directory and the same items, task by task.

    .venv/bin/python bench/eval_vs_harness.py                       # 6 layers x 384 llama, 200 items per task
    .venv/bin/python bench/eval_vs_harness.py --items 100 --rounds 3 --dtypes fp32 bf16 --layers 12 --width 768

The model is a llama of our Decoder (seeded random weights, untied head) with a byte-level BPE tokenizer trained
on tinyshakespeare, written once by modeldir's writer: ours loads it as `commonlm eval` does (cli._inference_model:
the dtype asked for, bf16 weights packed for oneDNN), the harness reads the same directory with transformers
(HFLM, `dtype` the same, `max_length` the model's context). The items, zero-shot, the same `--items` spread over
each task: MMLU (four one-letter choices after a long question), BIG-bench social_iqa (three choices of several
words), and a HellaSwag-layout task made here from tinyshakespeare (the hellaswag preset: activity label, a
speech and the start of the next as the context, four endings of 10-30 tokens, the next speech's own and three
drawn from others: long shared contexts and long choices). The harness gets them through evaluate/harness.py's
task writer (the same prompts, choices and delimiters).

Timed: ours, `score_tasks` on the loaded task (encoding, batching, forwards, scoring); theirs, `simple_evaluate`
on the already-built HFLM (reading the written task files, building requests, encoding, forwards, metrics; the
TaskManager that indexes the task folder is made before the clock starts). Model loading is outside both. Same
batch size (ours counts rows of a forward pass, each holding a context with all its choices; theirs, one
(context, choice) pair), the same torch thread count to start with (ours then follows the CPUs other processes
leave free, looked at between forward passes, as `commonlm eval` does). One untimed warm-up of each side, then
`--rounds` rounds, each task timed on both sides back to back; items per second is the median round's, and each
round's own ratio is printed with the load average at its start (the machine is shared: rounds at a lower load
are the cleaner ones). The accuracies and every item's picks are compared (log-likelihoods to 1e-4 nats in fp32;
bf16 rounds differently in two implementations, so there only the count of differing picks is reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
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
from commonlm.evaluate.tasks import limited, load_task_file, load_tasks  # noqa: E402
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


def speech_endings(folder: Path, items: int, seed: int = 0) -> Path:
    """A HellaSwag-layout task file from tinyshakespeare: the speaker as the activity label, a speech as ctx_a, the
    first words of the next speech as ctx_b, and four endings (that speech's rest and three others' rests)."""
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    speeches = []
    for block in text.split("\n\n"):
        speaker, _, speech = block.partition(":\n")
        words = speech.split()
        if speaker and "\n" not in speaker and 12 <= len(words) <= 60:
            speeches.append((speaker.strip(), words))
    rng = random.Random(seed)
    records = []
    for i in rng.sample(range(1, len(speeches)), items):
        (_, before), (speaker, words) = speeches[i - 1], speeches[i]
        cut = max(3, len(words) // 3)
        endings = [" ".join(words[cut : cut + 20])]
        endings += [" ".join(w[len(w) // 3 : len(w) // 3 + 20]) for _, w in rng.sample(speeches, 3)]
        order = rng.sample(range(4), 4)
        records.append({"activity_label": speaker.title(), "ctx_a": " ".join(before), "ctx_b": " ".join(words[:cut]),
                        "endings": [endings[j] for j in order], "label": order.index(0)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "speeches.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (folder / "speech_endings.yaml").write_text("data: speeches.jsonl\nlayout: hellaswag\nname: speech_endings\n")
    return folder / "speech_endings.yaml"


def run_ours(lm, task, batch_size: int):
    started = time.perf_counter()
    results = score_tasks(lm.model, lm.tokenizer, [task], few_shot=0, batch_size=batch_size)
    return time.perf_counter() - started, results[0]


def run_harness(lm, task, folder: Path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from commonlm.evaluate.harness import _result

    folder.mkdir(parents=True, exist_ok=True)
    name, items = write_harness_task(task, folder, few_shot=0)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    started = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[name], log_samples=True, bootstrap_iters=0, random_seed=None,
                          numpy_random_seed=None, torch_random_seed=None, task_manager=manager)
    return time.perf_counter() - started, _result(task, name, items, out, 0.0)


def compare(dtype: str, args, model_dir: Path, tasks, tmp: Path) -> tuple[list[list[object]], list[list[object]]]:
    """(speed rows, agreement rows) of one dtype, a row per task and a row for all of them."""
    ours_lm = ours_model(model_dir, dtype)
    theirs_lm = harness_model(model_dir, dtype, args.batch_size, args.context)
    for task in tasks:
        warm = dataclasses.replace(task, items=task.items[:4])
        run_ours(ours_lm, warm, args.batch_size)
        run_harness(theirs_lm, warm, tmp / f"warm-{dtype}-{tasks.index(task)}")
    ours_s = {t.name: [] for t in tasks}
    theirs_s = {t.name: [] for t in tasks}
    results = {}
    for r in range(args.rounds):
        load = load_average().split()[0]
        for n, task in enumerate(tasks):
            seconds, mine = run_ours(ours_lm, task, args.batch_size)
            ours_s[task.name].append(seconds)
            seconds, other = run_harness(theirs_lm, task, tmp / f"{dtype}-{r}-{n}")
            theirs_s[task.name].append(seconds)
            results[task.name] = (mine, other)
        line = ", ".join(f"{t.name} {ours_s[t.name][-1]:.2f} / {theirs_s[t.name][-1]:.2f} s "
                         f"({theirs_s[t.name][-1] / ours_s[t.name][-1]:.2f}x)" for t in tasks)
        print(f"  {dtype} round {r + 1} (load {load}): ours / harness {line}", flush=True)
    speed, agreement = [], []
    for task in tasks:
        mine, other = results[task.name]
        speed.append(speed_row(task.name, dtype, len(task.items), ours_s[task.name], theirs_s[task.name]))
        lines = disagreements(mine, other, args.tolerance if dtype == "fp32" else float("inf"))
        differ = {line.split(": ")[0] for line in lines}  # (each line starts with its item's file:line)
        agreement.append([f"{mine.name} ({dtype})", mine.items,
                          f"{mine.metrics['acc']:.4f} / {other.metrics['acc']:.4f}",
                          f"{mine.metrics['acc_norm']:.4f} / {other.metrics['acc_norm']:.4f}", len(differ)])
    ours_total = [sum(s[r] for s in ours_s.values()) for r in range(args.rounds)]
    theirs_total = [sum(s[r] for s in theirs_s.values()) for r in range(args.rounds)]
    speed.append(speed_row("all", dtype, sum(len(t.items) for t in tasks), ours_total, theirs_total))
    return speed, agreement


def speed_row(name: str, dtype: str, items: int, ours: list[float], theirs: list[float]) -> list[object]:
    """Items per second of each side (the median round's), their ratio, and each round's own ratio."""
    ours_rate, theirs_rate = items / median(ours), items / median(theirs)
    ratios = sorted(t / o for o, t in zip(ours, theirs))
    return [name, dtype, items, f"{ours_rate:.1f}", f"{theirs_rate:.1f}", f"{ours_rate / theirs_rate:.2f}x",
            " ".join(f"{x:.2f}" for x in ratios)]


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
    with tempfile.TemporaryDirectory(prefix="commonlm-bench-eval-") as tmp:
        tmp = Path(tmp)
        params = build_model(tmp / "model", args.layers, args.width, args.vocab, args.context)
        tasks = [t for name in TASKS for t in load_tasks(name, DATA)]
        tasks.append(load_task_file(speech_endings(tmp / "speeches", args.items)))
        for task in tasks:
            task.items = limited(task.items, args.items)
        speed, agreement = [], []
        for dtype in args.dtypes:
            rows, agree = compare(dtype, args, tmp / "model", tasks, tmp)
            speed += rows
            agreement += agree
    print(f"\nmodel: llama {args.layers} layers x {args.width}, vocabulary {args.vocab}, {params / 1e6:.1f}M "
          f"parameters, context {args.context}; batch size {args.batch_size}; zero-shot")
    print(f"{machine()}; load average {load_average()} at the end; median of {args.rounds} rounds\n")
    print(markdown_table(["task", "dtype", "items", "ours items/s", "harness items/s", "ratio (medians)",
                          "each round's ratio"], speed))
    print()
    print(markdown_table(["task", "items", "acc ours / harness", "acc_norm ours / harness", "items differing"],
                         agreement))


if __name__ == "__main__":
    main()
