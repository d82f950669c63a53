"""Downstream tasks from local files: a jsonl of items and a few lines of YAML saying how to ask and score them.

People judge a model by tasks (MMLU, HellaSwag, GSM8K, ...), not by its validation loss. Nothing is ever
downloaded: a task is the user's own files, or a named benchmark found under a data root. A task file:

    data: items.jsonl            # one JSON object per line, relative to this file
    layout: choice               # choice | cloze | generate, or a preset of LAYOUTS below (mmlu, gsm8k, ...)
    prompt: "Question: {question}\\nAnswer:"    # Python format fields of an item ({choices[0]} works too)
    choices: choices             # choice: a field holding the list of choices, or a list of templates
    answer: answer               # choice: the right choice's index (or label, see `labels`); else the target text
                                 # (a field, or a template such as "{test}\ncheck({entry_point})")
    labels: choices.label        # optional: `answer` names one of these labels (ARC's "A".."E"; a field or a list)
    blank: false                 # choice: each choice fills the "_" in the prompt, and the rest of the prompt after
                                 # it is scored under each (WinoGrande's partial scoring)
    delimiter: " "               # between the prompt and a choice or target (lm-evaluation-harness's target_delimiter)
    description: ""              # text before the few-shot examples (may use fields: "... about {subject}.\\n\\n")
    few_shot: 0                  # examples before each item (--few-shot overrides)
    few_shot_from: train.jsonl   # where examples come from (default: the other items of `data`, never the item)
    few_shot_same: subject       # optional: examples share this field's value with the item
    separator: "\\n\\n"            # after each example
    metric: gsm8k                # generate: gsm8k (final number), exact (exact match, whitespace aside), or code
                                 # (HumanEval: runs prompt + completion + the answer's tests; evaluate/code.py)
    stop: ["\\n\\n"]               # generate: the answer ends before any of these
    max_tokens: 256              # generate: the most new tokens

`choice` scores each choice by the log-likelihood of its continuation (acc, and acc_norm divided by its
length in characters, as lm-evaluation-harness does); `cloze` asks whether greedy decoding gives exactly the
target (LAMBADA: the last word of `prompt` when no `answer`); `generate` decodes greedily and checks the
answer. BIG-bench's own task.json is read by evaluate/bigbench.py into the same `Task`.
"""

from __future__ import annotations

import gzip
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from commonlm.errors import UserError

METRICS = ("gsm8k", "exact", "code")
DATA_ROOT_ENV = "COMMONLM_DATA_ROOT"
MMLU_LETTERS = ["A", "B", "C", "D"]
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]  # a completed function ends before these

# Presets, as lm-evaluation-harness words these tasks (a task file's own keys override them).
LAYOUTS: dict[str, dict] = {
    "choice": {"kind": "choice"},
    "cloze": {"kind": "cloze"},
    "generate": {"kind": "generate"},
    "mmlu": {"kind": "choice", "description": "The following are multiple choice questions (with answers) about "
             "{subject}.\n\n", "prompt": "{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\n"
             "D. {choices[3]}\nAnswer:", "choices": MMLU_LETTERS, "answer": "answer", "few_shot_same": "subject"},
    "hellaswag": {"kind": "choice", "prepare": "hellaswag", "prompt": "{query}", "choices": "endings",
                  "answer": "label"},
    "winogrande": {"kind": "choice", "prompt": "{sentence}", "blank": True, "choices": ["{option1}", "{option2}"],
                   "labels": ["1", "2"], "answer": "answer"},
    "arc": {"kind": "choice", "prompt": "Question: {question}\nAnswer:", "choices": "choices.text",
            "labels": "choices.label", "answer": "answerKey"},
    "piqa": {"kind": "choice", "prompt": "Question: {goal}\nAnswer:", "choices": ["{sol1}", "{sol2}"],
             "answer": "label"},
    "boolq": {"kind": "choice", "prompt": "{passage}\nQuestion: {question}?\nAnswer:", "choices": ["no", "yes"],
              "answer": "label"},
    "lambada": {"kind": "cloze", "prompt": "{text}"},
    "gsm8k": {"kind": "generate", "prompt": "Question: {question}\nAnswer:", "answer": "answer", "metric": "gsm8k",
              "stop": ["Question:", "\n\n"]},
    # executes model-written code (evaluate/code.py): runs only with --code-timeout
    "humaneval": {"kind": "generate", "prompt": "{prompt}", "answer": "{test}\ncheck({entry_point})\n",
                  "delimiter": "", "metric": "code", "stop": CODE_STOP, "max_tokens": 512},
}
KEYS = {"data", "layout", "name", "prompt", "choices", "labels", "answer", "delimiter", "description", "few_shot",
        "few_shot_from", "few_shot_same", "separator", "metric", "stop", "max_tokens", "blank"}


@dataclass
class Item:
    """One question, ready to score: its text, what counts as right, and how it reads as a few-shot example."""

    where: str  # "file:line", for messages and to keep an item out of its own few-shot examples
    context: str
    choices: list[str] = field(default_factory=list)  # choice: continuations as scored (delimiter included)
    credit: list[float] = field(default_factory=list)  # choice: the score for picking each (one-hot, or BIG-bench's)
    lengths: list[int] = field(default_factory=list)  # choice: characters of each choice, for acc_norm
    contexts: list[str] = field(default_factory=list)  # choice with a blank: each choice's own context
    targets: list[str] = field(default_factory=list)  # cloze: the continuation; generate: any of these is right
    shot: str = ""  # the item as a few-shot example: context, delimiter, right answer
    description: str = ""
    group: str | None = None  # few-shot examples come from items of the same group


@dataclass
class Task:
    name: str
    kind: str
    items: list[Item]
    pool: list[Item]  # where few-shot examples come from
    few_shot: int = 0
    separator: str = "\n\n"
    metric: str = "exact"
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    max_tokens: int = 256
    output_regex: str | None = None  # BIG-bench: the answer is the first match of this in the generated text
    code_timeout: float | None = None  # metric code: seconds per program (evaluate/code.py); none: refuses to run
    family: str | None = None  # BIG-bench subtasks: the task they belong to (reported as the mean of them)
    cut: bool = True  # a prompt longer than the model's context loses its beginning; False: an error (passkey)
    source: str = ""
    _groups: dict | None = None

    @property
    def chance(self) -> float:
        """The expected score of answering at random: mean of 1/choices (of the credits), 0 for generated answers."""
        if self.kind != "choice" or not self.items:
            return 0.0
        return sum(sum(item.credit) / len(item.credit) for item in self.items) / len(self.items)

    def examples_for(self, item: Item, k: int, seed: int = 1234) -> list[Item]:
        """`k` few-shot examples for `item`: drawn from the pool (its group's part), never the item itself; the
        same ones in every run and whatever --limit selects (the draw is seeded by the item's place)."""
        if k <= 0:
            return []
        if self._groups is None:
            self._groups = {}
            for example in self.pool:
                self._groups.setdefault(example.group, []).append(example)
        candidates = self._groups.get(item.group, [])
        drawn = random.Random(f"{seed}:{item.where}").sample(candidates, min(k + 1, len(candidates)))
        shots = [example for example in drawn if example.where != item.where][:k]
        if len(shots) < k:
            same = f" with the same {item.group!r}" if item.group is not None else ""
            raise UserError(f"{item.where}: --few-shot {k} needs {k} other items{same} to draw examples from, "
                            f"{self.source} has {len(shots)}; use fewer shots or give `few_shot_from`")
        return shots

    def prompt(self, item: Item, k: int | None = None, context: str | None = None) -> str:
        """description, then k examples each followed by the separator, then the item (or `context`)."""
        shots = self.examples_for(item, self.few_shot if k is None else k)
        return item.description + "".join(s.shot + self.separator for s in shots) + (context or item.context)


def data_root(given: str | Path | None = None) -> Path | None:
    """Where named benchmarks live: --data-root, else $COMMONLM_DATA_ROOT, else ../shared/data when it exists."""
    if given:
        return Path(given)
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV])
    beside = Path("..") / "shared" / "data"
    return beside if beside.is_dir() else None


def load_tasks(spec: str, root: str | Path | None = None) -> list[Task]:
    """A task file (YAML), a BIG-bench task.json or its directory, or a name: mmlu, gsm8k, bigbench:NAME."""
    from commonlm.evaluate.bigbench import load_bigbench

    path = Path(spec).expanduser()
    if path.is_dir() or path.name == "task.json":
        return load_bigbench(path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"--task {spec}: no such file")
        return [load_task_file(path)]
    if path.exists():
        raise UserError(f"--task {spec}: give a task file (.yaml, see evaluate/tasks.py), a BIG-bench task.json or "
                        "its directory, or a name (mmlu, gsm8k, bigbench:NAME)")
    return _named(spec, root)


def _named(name: str, root: str | Path | None) -> list[Task]:
    if name.startswith("passkey:"):  # generated on the spot, nothing to find (data/passkey.py)
        from commonlm.data.passkey import passkey_task

        return [passkey_task(name)]
    where = data_root(root)
    how = f"pass --data-root DIR or set ${DATA_ROOT_ENV} (the folder holding mmlu/, gsm8k/, bigbench/)"
    files = {"mmlu": "mmlu/test.jsonl", "gsm8k": "gsm8k/test.jsonl", "humaneval": "humaneval/HumanEval.jsonl.gz"}
    if name not in files and not name.startswith("bigbench:"):
        raise UserError(f"--task {name}: no such file, and not a named task (mmlu, gsm8k, humaneval, bigbench:NAME, "
                        "passkey:LEN)")
    if where is None:
        raise UserError(f"--task {name}: no data root to find it in; {how}. Nothing is ever downloaded")
    if name.startswith("bigbench:"):
        folder = where / "bigbench" / name.split(":", 1)[1]
        if not folder.is_dir():
            have = sorted(p.name for p in (where / "bigbench").glob("*") if p.is_dir())
            raise UserError(f"--task {name}: no {folder}" + (f" (there: {', '.join(have)})" if have else f"; {how}"))
        from commonlm.evaluate.bigbench import load_bigbench

        return load_bigbench(folder)
    data = where / files[name]
    if not data.is_file():
        raise UserError(f"--task {name}: no {data}; {how}. Nothing is ever downloaded")
    spec = {"layout": name, "data": str(data.resolve()), "name": name}
    if name == "gsm8k" and (data.parent / "train.jsonl").is_file():
        spec["few_shot_from"] = str((data.parent / "train.jsonl").resolve())
    return [task_from_spec(spec, data.parent / f"{name}.yaml")]


def load_task_file(path: Path) -> Task:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a task file is a YAML mapping (data:, prompt:, ...; see evaluate/tasks.py)")
    return task_from_spec(spec, path)


def task_from_spec(spec: dict, path: Path) -> Task:
    """A task from a task file's mapping (`path` names it in messages and anchors relative data paths)."""
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(KEYS - {'kind'}))}")
    layout = spec.get("layout") or ("choice" if "choices" in spec else "generate")
    if layout not in LAYOUTS:
        raise UserError(f"{path}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    spec = {**LAYOUTS[layout], **spec}
    kind = spec["kind"]
    needed = ["data", "prompt"] + {"choice": ["choices", "answer"], "generate": ["answer"]}.get(kind, [])
    for key in needed:
        if spec.get(key) in (None, ""):
            raise UserError(f"{path}: no `{key}:` (layout {layout} needs it; see evaluate/tasks.py for the format)")
    metric = spec.get("metric", "exact")
    if metric not in METRICS:
        raise UserError(f"{path}: metric {metric!r} is not one of {', '.join(METRICS)}")
    few_shot = _nonnegative_int(spec.get("few_shot", 0), path, "few_shot")
    max_tokens = _nonnegative_int(spec.get("max_tokens", 256), path, "max_tokens")
    stop = spec.get("stop", ["\n\n"])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{path}: stop must be a text or a list of non-empty texts")
    data = _relative(spec["data"], path)
    items = [_item(record, where, spec, kind, path) for record, where in read_jsonl(data)]
    if not items:
        raise UserError(f"{data}: no items (an empty task); give a jsonl file with one JSON object per line")
    pool = items
    if spec.get("few_shot_from"):
        pool = [_item(record, where, spec, kind, path) for record, where in read_jsonl(_relative(spec["few_shot_from"],
                                                                                                    path))]
    return Task(name=str(spec.get("name") or path.stem), kind=kind, items=items, pool=pool, few_shot=few_shot,
                separator=str(spec.get("separator", "\n\n")), metric=metric, stop=stop, max_tokens=max(1, max_tokens),
                source=str(data))


def _nonnegative_int(value, path: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{path}: {key} must be a whole number >= 0, not {value!r}")
    return value


def _relative(name: str, path: Path) -> Path:
    file = Path(str(name)).expanduser()
    return file if file.is_absolute() else path.parent / file


def read_jsonl(path: Path) -> list[tuple[dict, str]]:
    """(record, "file:line") for each non-blank line (of a gzip-compressed file too: HumanEval.jsonl.gz)."""
    from commonlm.data.chat import read_records

    if not path.is_file():
        raise UserError(f"{path}: no such file (a task's items: one JSON object per line)")
    if path.suffix == ".gz":
        with tempfile.TemporaryDirectory() as tmp:  # read_records reads files; errors still name the .gz
            plain = Path(tmp) / path.stem
            plain.write_bytes(gzip.decompress(path.read_bytes()))
            return [(record, str(path) + where[len(str(plain)):]) for record, where in read_jsonl(plain)]
    records = []
    for where, record in read_records([str(path)], what="task"):
        if not isinstance(record, dict):
            raise UserError(f"{where}: an item is a JSON object ({{\"field\": ...}}), not {type(record).__name__}")
        records.append((record, where))
    return records


def field_of(record: dict, name: str, where: str):
    """`record`'s value at a field path like "choices.text"."""
    value = record
    for part in str(name).split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"{where}: no field {name!r} (the item has {', '.join(map(repr, record)) or 'no fields'})")
        value = value[part]
    return value


def render(template: str, record: dict, where: str, path: Path) -> str:
    try:
        return str(template).format_map(record)
    except KeyError as e:
        raise UserError(f"{where}: no field {e.args[0]!r}, which {path.name} uses in {template!r} (the item has "
                        f"{', '.join(map(repr, record)) or 'no fields'})") from None
    except (IndexError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}: cannot fill {template!r} from this item ({type(e).__name__}: {e})") from None


def _item(record: dict, where: str, spec: dict, kind: str, path: Path) -> Item:
    if spec.get("prepare") == "hellaswag":
        record = _hellaswag(record, where)
    context = render(spec["prompt"], record, where, path)
    delimiter = str(spec.get("delimiter", " "))
    description = render(spec.get("description", ""), record, where, path)
    group = None
    if spec.get("few_shot_same"):
        group = str(field_of(record, spec["few_shot_same"], where))
    if kind == "choice":
        choices = _choices(record, where, spec, path)
        right = _answer_index(record, where, spec, choices)
        credit = [float(i == right) for i in range(len(choices))]
        if spec.get("blank"):
            return _blank_item(where, context, choices, credit, right, delimiter, description, group)
        return Item(where, context, choices=[delimiter + c for c in choices], credit=credit,
                    lengths=[len(c) for c in choices], shot=context + delimiter + choices[right],
                    description=description, group=group)
    if kind == "cloze" and not spec.get("answer"):
        head, space, last = context.rstrip().rpartition(" ")
        if not space or not last:
            raise UserError(f"{where}: a cloze item needs a last word to predict; its prompt {context[:60]!r} has none")
        context, target = head, last
    elif "{" in str(spec["answer"]):  # a template (HumanEval's tests and check call)
        target = render(spec["answer"], record, where, path)
    else:
        target = str(field_of(record, spec["answer"], where))
    return Item(where, context, targets=[delimiter + target] if kind == "cloze" else [target],
                shot=context + delimiter + target, description=description, group=group)


def _blank_item(where: str, sentence: str, choices: list[str], credit: list[float], right: int, delimiter: str,
                description: str, group: str | None) -> Item:
    """WinoGrande's partial scoring, as lm-evaluation-harness does it: each choice fills the blank, and the same
    rest of the sentence is scored after each (acc_norm divides by the length of each filled-in context)."""
    head, blank, rest = sentence.partition("_")
    if not blank or not rest.strip():
        raise UserError(f"{where}: the prompt {sentence[:60]!r} has no blank '_' with text after it to score")
    contexts = [head + choice for choice in choices]
    continuation = delimiter + rest.strip()
    return Item(where, contexts[right], choices=[continuation] * len(choices), credit=credit,
                lengths=[len(c) for c in contexts], contexts=contexts, shot=contexts[right] + continuation,
                description=description, group=group)


def _hellaswag(record: dict, where: str) -> dict:
    """HellaSwag's fields as lm-evaluation-harness words them: `query` (activity label, ctx_a and ctx_b
    capitalised) and cleaned `endings` (WikiHow's [title]/[step] artifacts removed)."""
    def clean(text: str) -> str:
        text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
        return text.replace("  ", " ")

    ctx = f"{field_of(record, 'ctx_a', where)} {str(field_of(record, 'ctx_b', where)).capitalize()}"
    endings = field_of(record, "endings", where)
    if not isinstance(endings, list):
        raise UserError(f"{where}: field 'endings' must be a list of texts (the choices)")
    return {**record, "query": clean(f"{field_of(record, 'activity_label', where)}: {ctx}"),
            "endings": [clean(str(e)) for e in endings]}


def _choices(record: dict, where: str, spec: dict, path: Path) -> list[str]:
    given = spec["choices"]
    if isinstance(given, list):
        choices = [render(c, record, where, path) for c in given]
    else:
        choices = field_of(record, given, where)
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: field {given!r} must be a list of texts (the choices)")
    if len(choices) < 2:
        raise UserError(f"{where}: {len(choices)} choice(s); a multiple-choice item needs at least 2")
    return choices


def _answer_index(record: dict, where: str, spec: dict, choices: list[str]) -> int:
    """The right choice's index from the answer field: an index, a label (with `labels`), or a choice's text."""
    answer = field_of(record, spec["answer"], where)
    if spec.get("labels"):
        given = spec["labels"]
        labels = [str(label) for label in (given if isinstance(given, list) else field_of(record, given, where))]
        if str(answer) not in labels:
            raise UserError(f"{where}: answer {answer!r} is none of the labels {labels}")
        answer = labels.index(str(answer))
    elif isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
        answer = int(answer)
    elif isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if not isinstance(answer, int):  # (bool is an int: BoolQ's true is choice 1)
        raise UserError(f"{where}: answer {answer!r} is not a choice index (0-{len(choices) - 1}) or a choice")
    if not 0 <= answer < len(choices):
        raise UserError(f"{where}: answer {answer} is out of range for {len(choices)} choices "
                        f"(0-{len(choices) - 1})")
    return int(answer)


def limited(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over the list (a file sorted by subject, as MMLU's is, is sampled across it);
    all of them without a limit."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[math.floor(i * len(items) / limit)] for i in range(limit)]
