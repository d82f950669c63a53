"""The cross-check: run EleutherAI's lm-evaluation-harness on the same items and compare with ours, item by item.

A score is only trusted if someone else's code gets it too. Our model directories are transformers
directories, so the harness's "hf" model reads them as they are. Each of our tasks is written as a harness
task (a YAML file and local json data, its `dataset_path: json` route) whose prompts are exactly ours:
every item carries its full prompt prefix (description and our few-shot examples) in a field the harness
uses as its per-item description, so both sides score the same texts and differ only in the code that
tokenizes, batches and sums log-likelihoods. Nothing is downloaded: the harness runs with
HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set and datasets' cache in a temporary directory.

    python -m commonlm.evaluate.harness MODEL_DIR --task T.yaml [--few-shot K] [--limit N]

prints both accuracies per task and every item whose log-likelihoods or picks differ (exit status 1 if any).
Multiple choice (acc, acc_norm; a blank layout as the harness's WinoGrande partial scoring) and cloze
(acc = greedy match, perplexity) tasks are bridged; generative tasks are not (their checkers are ours).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from commonlm.errors import UserError
from commonlm.evaluate.scoring import TaskResult
from commonlm.evaluate.tasks import Item, Task, limited

LL_TOLERANCE = 1e-4  # nats: the harness runs transformers' implementation of the model, we run ours (fp32)


def write_harness_task(task: Task, folder: Path, few_shot: int | None = None,
                       limit: int | None = None) -> tuple[str, list[Item]]:
    """Write `task` as a harness task (NAME.yaml + NAME.jsonl) into `folder`: (its harness name, the items in it).

    Fields of each json record: `prefix` (description and few-shot examples, as our prompt has them), and for
    choices `context`, `choices` (without the delimiter, so acc_norm divides by the same lengths) and `gold`; for
    a blank, `contexts` (each choice filled in), `continuation` and `gold`; for cloze `context` and `target`."""
    if task.kind not in ("choice", "cloze"):
        raise UserError(f"harness: task {task.name} is {task.kind}; the cross-check covers multiple choice and cloze "
                        "tasks (generated answers are checked by our own checkers)")
    k = task.few_shot if few_shot is None else few_shot
    items = limited(task.items, limit)
    name = "commonlm_" + re.sub(r"[^A-Za-z0-9_]", "_", task.name)
    records, delimiters = [], set()
    for item in items:
        prompt = task.prompt(item, k)
        record = {"where": item.where, "prefix": prompt[: len(prompt) - len(item.context)]}
        if task.kind == "cloze":
            record.update(context=item.context, target=item.targets[0])
        else:
            if any(c not in (0.0, 1.0) for c in item.credit) or 1.0 not in item.credit:
                raise UserError(f"harness: {item.where}: partial credit ({item.credit}); the harness scores a pick "
                                "as right or wrong, so only items with right answers of full credit compare")
            right = [i for i, c in enumerate(item.credit) if c == 1.0]
            record["gold"] = right
            if item.contexts:
                record.update(contexts=item.contexts, continuation=item.choices[0])
            else:
                raw = [choice[len(choice) - n:] if n else "" for choice, n in zip(item.choices, item.lengths)]
                delimiters.update(choice[: len(choice) - len(r)] for choice, r in zip(item.choices, raw))
                record.update(context=item.context, choices=raw)
        records.append(record)
    if len(delimiters) > 1:
        raise UserError(f"harness: task {task.name} puts different delimiters before its choices "
                        f"({sorted(delimiters)}); the harness takes one per task")
    single = all(len(r.get("gold", [0])) == 1 for r in records)
    for record in records:  # one right answer: an index (a list would be the harness's several-targets mode)
        if single and "gold" in record:
            record["gold"] = record["gold"][0]
    if any(isinstance(r.get("gold"), list) for r in records) and task.kind == "choice" and items[0].contexts:
        raise UserError(f"harness: task {task.name} has a blank and items with several right answers; the harness "
                        "takes one right answer per item in that layout")
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    spec = {"task": name, "dataset_path": "json", "test_split": "train", "description": "prefix", "num_fewshot": 0,
            "dataset_kwargs": {"data_files": {"train": str(data)}, "cache_dir": str(folder / "datasets-cache")}}
    if task.kind == "cloze":
        spec.update(output_type="loglikelihood", doc_to_text="context", doc_to_target="target", target_delimiter="",
                    metric_list=[_metric("acc"), _metric("perplexity", "perplexity", False)])
    else:
        blank = bool(items[0].contexts)
        spec.update(output_type="multiple_choice", metric_list=[_metric("acc"), _metric("acc_norm")])
        if blank:  # the harness's multiple inputs: doc_to_text gives the right index, the choices are contexts
            spec.update(doc_to_text="gold", doc_to_choice="contexts", doc_to_target="continuation",
                        target_delimiter="")
        else:
            spec.update(doc_to_text="context", doc_to_choice="choices", doc_to_target="gold",
                        target_delimiter=delimiters.pop() if delimiters else " ")
    import yaml

    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return name, items


def _metric(name: str, aggregation: str = "mean", higher_is_better: bool = True) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def run_harness(model_dir: str | Path, tasks: list[Task], few_shot: int | None = None, limit: int | None = None,
                batch_size: int = 16, device: str = "cpu") -> list[TaskResult]:
    """lm-evaluation-harness's scores of `tasks` on the transformers model directory `model_dir`, offline, as
    TaskResults whose per_item entries have the shape of ours (plus the harness's own per-item acc/acc_norm)."""
    from commonlm.api import resolve_model_path

    model_dir = resolve_model_path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"harness: {model_dir} has no config.json; give a model directory (a run's final/)")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "commonlm":
        raise UserError(f"harness: {model_dir} is saved in our own layout ({config.get('commonlm_note', '')}); "
                        "transformers, and so the harness, cannot read it")
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # (read when datasets is imported)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("harness: lm-evaluation-harness is not installed (pip install 'commonlm[dev]' or "
                        "pip install lm-eval==0.4.13)") from None
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from commonlm.modeldir import read_run_config

    max_len = read_run_config(model_dir)[0].model.max_seq_len
    with tempfile.TemporaryDirectory(prefix="commonlm-harness-") as tmp:
        written = [write_harness_task(task, Path(tmp), few_shot, limit) for task in tasks]
        names = [name for name, _ in written]
        if len(set(names)) < len(names):
            raise UserError(f"harness: two tasks share a name ({', '.join(names)}); the harness needs them apart")
        started = time.perf_counter()
        # no seeds: nothing is drawn (the few-shot examples are ours, in each item's prefix), so the caller's
        # random generators are left as they were
        out = simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "max_length": max_len},
            tasks=names, batch_size=batch_size, device=device, log_samples=True, bootstrap_iters=0,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            task_manager=TaskManager(include_path=tmp, include_defaults=False))
        seconds = time.perf_counter() - started
    return [_result(task, name, items, out, seconds / len(tasks)) for task, (name, items) in zip(tasks, written)]


def _result(task: Task, name: str, items: list[Item], out: dict, seconds: float) -> TaskResult:
    scores = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    per_item = []
    for item, sample in zip(items, samples):
        if task.kind == "cloze":
            ll, greedy = sample["filtered_resps"][0]
            per_item.append({"where": item.where, "loglikelihood": float(ll), "greedy": bool(greedy)})
            continue
        lls = [float(ll) for ll, _ in sample["filtered_resps"]]
        lengths = [len(c) for c in (item.contexts or sample["doc"]["choices"])]
        per_item.append({"where": item.where, "loglikelihoods": lls, "pick": max(range(len(lls)), key=lls.__getitem__),
                         "pick_norm": max(range(len(lls)), key=lambda i: lls[i] / max(lengths[i], 1)),
                         "acc": float(sample["acc"]), "acc_norm": float(sample["acc_norm"])})
    if task.kind == "cloze":
        metrics = {"acc": scores["acc,none"], "ppl": scores["perplexity,none"]}
    else:
        metrics = {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]}
    return TaskResult(task.name, task.kind, len(items), metrics, task.chance, 0, seconds, task.family, per_item)


def disagreements(ours: TaskResult, theirs: TaskResult, tolerance: float = LL_TOLERANCE) -> list[str]:
    """Lines naming each item where the two results differ: a log-likelihood by more than `tolerance`, a pick,
    or a greedy match; empty when they agree item by item."""
    lines = []
    for mine, other in zip(ours.per_item, theirs.per_item):
        where = mine["where"]
        a = mine.get("loglikelihoods", [mine.get("loglikelihood")])
        b = other.get("loglikelihoods", [other.get("loglikelihood")])
        worst = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
        if len(a) != len(b) or worst > tolerance:
            lines.append(f"{where}: log-likelihoods {_short(a)} (ours) vs {_short(b)} (harness)")
        for key in ("pick", "pick_norm", "greedy"):
            if key in mine and mine[key] != other.get(key):
                lines.append(f"{where}: {key} {mine[key]} (ours) vs {other.get(key)} (harness)")
    if len(ours.per_item) != len(theirs.per_item):
        lines.append(f"{ours.name}: {len(ours.per_item)} items (ours) vs {len(theirs.per_item)} (harness)")
    return lines


def _short(values: list) -> str:
    return "[" + ", ".join("nan" if v is None or math.isnan(v) else f"{v:.5f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> int:
    from commonlm.api import load
    from commonlm.evaluate.tasks import load_tasks

    p = argparse.ArgumentParser(prog="python -m commonlm.evaluate.harness",
                                description="score tasks with our code and with lm-evaluation-harness; compare")
    p.add_argument("model", help="model directory (a transformers directory: a run's final/)")
    p.add_argument("--task", nargs="+", required=True, metavar="PATH_OR_NAME", help="as `commonlm eval --task`")
    p.add_argument("--few-shot", type=int, help="examples before each item (ours, written into both prompts)")
    p.add_argument("--limit", type=int, help="this many items of each task, spread over it")
    p.add_argument("--data-root", help="where named tasks live")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # (a warning per prompt cut to the context, as ours)
    try:
        tasks = [task for spec in args.task for task in load_tasks(spec, args.data_root)]
        ours = load(args.model, device="cpu").evaluate_tasks(tasks, few_shot=args.few_shot, limit=args.limit,
                                                             batch_size=args.batch_size)
        theirs = run_harness(args.model, tasks, args.few_shot, args.limit, args.batch_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    differ = 0
    print(f"{'task':<40} {'items':>6} {'metric':>8} {'ours':>8} {'harness':>8}")
    for mine, other in zip([r for r in ours if r.per_item], theirs):
        for metric in other.metrics:
            print(f"{mine.name:<40} {mine.items:>6} {metric:>8} {mine.metrics[metric]:>8.4f} "
                  f"{other.metrics[metric]:>8.4f}")
        for line in disagreements(mine, other):
            differ += 1
            print("  differs: " + line)
    print("item by item: " + ("the same" if not differ else f"{differ} differences"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
