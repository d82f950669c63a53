"""BIG-bench's own task.json, read natively into a `Task` (evaluate/tasks.py).

A BIG-bench JSON task is a list of `examples` with an `input` and either `target_scores` (multiple choice: each
choice's credit) or `target` (a text, or a list of texts any of which is right), plus how to word them. We word
them as BIG-bench does: task_prefix, then the few-shot examples and the item, each as example_input_prefix +
input [+ choice_prefix + the choices, when append_choices_to_input] + example_output_prefix, examples followed by
their answer and few_shot_example_separator. Multiple choice scores each choice's log-likelihood right after
the output prefix (multiple_choice_grade: the credit of the most likely choice); generation is checked by
exact_str_match after cutting at stop_string and taking the first match of output_regex. The task's
preferred_score picks which when an example has both. A directory of subtask directories (arithmetic's
1_digit_addition, ...) gives one task per subtask, reported with their mean, as BIG-bench aggregates them.

Unlike BIG-bench, choices appended to the input are shuffled with Python's seeded `random`, not numpy's, so
their order in the prompt differs from BIG-bench's own runs (the scored continuations are the same).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from commonlm.errors import UserError
from commonlm.evaluate.tasks import Item, Task

DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "choice_prefix": "\n  choice: ", "append_choices_to_input": True, "few_shot_example_separator": "\n"}


def load_bigbench(path: Path) -> list[Task]:
    """The task in `path` (a task.json, or a directory holding one and/or subtask directories with theirs)."""
    path = Path(path)
    if path.is_file():
        return [read_task_json(path)]
    if not path.is_dir():
        raise UserError(f"--task {path}: no such file or directory")
    tasks = []
    top = path / "task.json"
    if top.is_file() and json_of(top).get("examples"):
        tasks.append(read_task_json(top))
    subtasks = sorted(p for p in path.iterdir() if (p / "task.json").is_file())
    tasks += [read_task_json(p / "task.json", family=path.name) for p in subtasks]
    if not tasks:
        raise UserError(f"{path}: no BIG-bench task here (a task.json with examples, or subtask directories with "
                        "theirs)")
    return tasks


def json_of(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: a BIG-bench task.json is a JSON object with `examples`")
    return data


def read_task_json(file: Path, family: str | None = None) -> Task:
    data = json_of(file)
    style = {key: data.get(key, default) for key, default in DEFAULTS.items()}
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{file}: no examples (an empty task); BIG-bench tasks list them under `examples`")
    name = str(data.get("name") or file.parent.name)
    metrics = data.get("metrics") or []
    preferred = data.get("preferred_score") or (metrics[0] if metrics else "")
    has_choices = all(isinstance(e, dict) and "target_scores" in e for e in examples)
    kind = "choice" if has_choices and (preferred == "multiple_choice_grade" or not all(
        isinstance(e, dict) and "target" in e for e in examples)) else "generate"
    items = [_item(e, f"{file}:example {i + 1}", style, kind, random.Random(f"{name}:{i}"))
             for i, e in enumerate(examples)]
    stop = ["\n\n"] + ([style["example_input_prefix"].rstrip()] if style["example_input_prefix"].strip() else [])
    if data.get("stop_string"):
        stop = [str(data["stop_string"])] + stop
    longest = max(len(t.encode("utf-8")) for item in items for t in item.targets) if kind == "generate" else 0
    return Task(name=f"bigbench:{family + '/' if family else ''}{name}", kind=kind, items=items, pool=items,
                few_shot=0, separator=style["few_shot_example_separator"], metric="exact", stop=stop,
                max_tokens=min(256, longest + 16), output_regex=data.get("output_regex"), family=family and
                f"bigbench:{family}", source=str(file))


def _item(example, where: str, style: dict, kind: str, rng: random.Random) -> Item:
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        raise UserError(f"{where}: an example is an object with an `input` text")
    text = example["input"]
    scores = example.get("target_scores")
    if kind == "choice":
        if not isinstance(scores, dict) or len(scores) < 2:
            raise UserError(f"{where}: `target_scores` must map at least 2 choices to their scores")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise UserError(f"{where}: `target_scores` values must be numbers (each choice's credit)")
        if style["append_choices_to_input"]:
            shown = sorted(scores)
            rng.shuffle(shown)
            text += style["choice_prefix"] + style["choice_prefix"].join(shown)
    context = style["example_input_prefix"] + text + style["example_output_prefix"]
    prefix = style["task_prefix"]
    if kind == "choice":
        choices = list(scores)
        best = max(choices, key=lambda c: scores[c])  # the first of the best, as BIG-bench picks it
        return Item(where, context, choices=choices, credit=[float(scores[c]) for c in choices],
                    lengths=[len(c) for c in choices], shot=context + _targets(example, where, best)[0],
                    description=prefix)
    targets = _targets(example, where, None)
    return Item(where, context, targets=targets, shot=context + targets[0], description=prefix)


def _targets(example: dict, where: str, fallback: str | None) -> list[str]:
    target = example.get("target", fallback)
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{where}: `target` must be a text or a non-empty list of texts")
    return targets
