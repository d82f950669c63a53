"""Run reports and side-by-side comparisons: what a person reads after a run.

`commonlm report RUN` writes one markdown file (RUN/report.md by default) with PNG plots beside it: the run's
summary and configuration, the hardware and code version, the loss curves (train/metrics.py's loss.png) and
lr/throughput/MFU curves from metrics.jsonl, the last validation values, the task results stored for the run,
and a few greedy samples from its final model.

Task results are stored for a run as the JSON that `commonlm eval` writes, under the run's eval/ folder:

    commonlm eval RUN --task mmlu arc.yaml --json RUN/eval/mmlu-arc.json

Every RUN/eval/*.json is read (a later file wins for a task name). `commonlm compare A B ... [--task ...]`
puts several runs or models side by side on the same tasks: results stored under each one's eval/ are used
when they cover a task with the same number of items, and the rest are scored here with evaluate/scoring.py.
The run does not record the machine or code it ran on, so the report names those it was written with.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from commonlm.errors import UserError, already_exists

EVAL_DIR = "eval"
BASE_PROMPTS = ["\n", "The ", "def "]
CHAT_PROMPTS = ["Hello! What can you do?", "What is 12 + 30?", "Write a Python function that reverses a list."]
CURVES = {"lr": "learning rate", "tok_per_s": "tokens/s", "mfu": "MFU (of the measured matmul peak)",
          "grad_norm": "gradient norm (before clipping)"}


def stored_results(path: str | Path) -> dict[str, dict]:
    """{task name: its result} from PATH/eval/*.json (lists of `commonlm eval --json` results), oldest file
    first so that a later one wins; each result gets "file", where it came from."""
    folder = Path(path) / EVAL_DIR
    results: dict[str, dict] = {}
    for file in sorted(folder.glob("*.json"), key=lambda f: (f.stat().st_mtime, f.name)):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{file}: not valid JSON ({e}); store task results there with commonlm eval ... "
                            "--json FILE") from None
        for result in data if isinstance(data, list) else [data]:
            if not isinstance(result, dict) or "task" not in result or "acc" not in result:
                raise UserError(f"{file}: not task results (a list of objects with task, acc, ...); store them "
                                "there with commonlm eval ... --task ... --json FILE")
            results[str(result["task"])] = {**result, "file": file.name}
    return results


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: bool = True,
                 prompts: list[str] | None = None, max_tokens: int = 48, device: str = "auto",
                 overwrite: bool = False) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report.md) with its PNGs beside it; its path."""
    from commonlm.train.metrics import plot_losses, read_metrics

    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file() or not (run / "commonlm.yaml").is_file():
        raise UserError(f"report: {run} is not a run directory (no metrics.jsonl and commonlm.yaml); give the --out "
                        "of a commonlm train or tune run")
    out = Path(out) if out else run / "report.md"
    if out.exists() and not overwrite:
        raise already_exists("report", out)
    if max_tokens < 1:
        raise UserError(f"report: --max-tokens {max_tokens} must be at least 1")
    records = read_metrics(run)
    config_text = (run / "commonlm.yaml").read_text(encoding="utf-8")
    lines = [f"# Run report: {run.resolve().name}", "",
             f"`{run}` · written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    lines += ["## Summary", "", *_summary(records), ""]

    lines += ["## Curves", ""]
    loss_png = plot_losses(run)
    if loss_png is not None:
        beside = out.parent / f"{out.stem}-loss.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        if beside.resolve() != loss_png.resolve():
            shutil.copyfile(loss_png, beside)
        lines += [f"![train and validation loss]({beside.name})", ""]
    curves = plot_curves(records, out.parent / f"{out.stem}-curves.png", run.resolve().name)
    if curves is not None:
        lines += [f"![learning rate, throughput and MFU]({curves.name})", ""]
    if loss_png is None and curves is None:
        lines += ["No training steps logged yet.", ""]

    lines += ["## Evaluation", ""]
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    if val:
        last = val[-1]
        keys = [k for k in last if k.startswith("val_")]
        lines += [f"Last validation (step {last.get('step', '?')}):", "",
                  *_markdown_table(["metric", "value"], [[k.removeprefix("val_"), _number(last[k])] for k in keys]),
                  ""]
    tasks = stored_results(run)
    if tasks:
        lines += [f"Tasks (stored in `{run / EVAL_DIR}`):", "", *_task_table(tasks), ""]
    else:
        lines += [f"No task results stored; store some with `commonlm eval {run} --task ... --json "
                  f"{run / EVAL_DIR}/NAME.json`.", ""]

    if samples:
        lines += ["## Samples", "", *_samples(run, config_text, prompts, max_tokens, device), ""]
    lines += ["## Hardware and code", "", *_environment(run), ""]
    lines += ["## Configuration", "", f"`{run / 'commonlm.yaml'}`:", "", "```yaml", config_text.rstrip(), "```", ""]
    from commonlm.utils import atomic_write_text

    atomic_write_text(out, "\n".join(lines))
    return out


def _summary(records: list[dict]) -> list[str]:
    steps = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    rows = []
    if steps:
        rows.append(["steps", f"{max(r.get('step', 0) for r in records):,}"])
        if "tokens" in steps[-1]:
            rows.append(["tokens", f"{steps[-1]['tokens']:,}"])
        rows.append(["last train loss", f"{steps[-1]['loss']:.4f}"])
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        rows.append(["best validation loss", f"{best['val_loss']:.4f} (step {best['step']})"])
    for key, name, scale in (("tok_per_s", "median tokens/s", 1), ("mfu", "median MFU", 100)):
        values = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
        if values:
            rows.append([name, f"{statistics.median(values) * scale:,.1f}" + ("%" if scale == 100 else "")])
    times = [r["time"] for r in records if "time" in r]
    if len(times) > 1:
        rows.append(["wall time (first to last record)", f"{(times[-1] - times[0]) / 60:.1f} min"])
    return _markdown_table(["", ""], rows) if rows else ["metrics.jsonl holds no records yet."]


def plot_curves(records: list[dict], out: Path, title: str) -> Path | None:
    """One PNG with a panel per logged curve (CURVES: lr, tokens/s, MFU, gradient norm) against steps."""
    present = [k for k in CURVES if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), dpi=110, sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        ax.plot(*zip(*points), linewidth=1)
        ax.set_ylabel(key)
        ax.set_title(CURVES[key], fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    return _save(fig, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    from commonlm.utils import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _samples(run: Path, config_text: str, prompts: list[str] | None, max_tokens: int, device: str) -> list[str]:
    """Greedy continuations from the run's final model (its newest checkpoint without one); a tuned run's
    answers to chat prompts."""
    import yaml

    from commonlm.api import load, resolve_model_path

    objective = ((yaml.safe_load(config_text) or {}).get("train") or {}).get("objective", "next_token")
    chat = objective in ("sft", "dpo", "grpo")
    prompts = prompts or (CHAT_PROMPTS if chat else BASE_PROMPTS)
    where = resolve_model_path(run)
    m = load(run, device=device)
    lines = [f"Greedy, at most {max_tokens} tokens, from `{where}`" + (" (as chat turns)" if chat else "") + ":", ""]
    for prompt in prompts:
        if chat:
            text = m.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
        else:
            text = m.generate(prompt, max_tokens=max_tokens, temperature=0.0)
        lines += [f"**{json.dumps(prompt)}** →", "", "```text", (prompt if not chat else "") + text, "```", ""]
    return lines


def _environment(run: Path) -> list[str]:
    """The machines and code of the run's starts (run_info.json, written by the loop), else this one's."""
    from commonlm.train.metrics import environment

    info = run / "run_info.json"
    if info.is_file():
        try:
            starts = json.loads(info.read_text(encoding="utf-8"))
        except ValueError:
            starts = []
        if starts:
            keys = [k for k in starts[0] if k != "step"]
            return [f"The run's {len(starts)} start(s) (`{info.name}`):", "",
                    *_markdown_table(["", *(f"from step {s.get('step', '?')}" for s in starts)],
                                     [[k, *(str(s.get(k, "")) for s in starts)] for k in keys])]
    rows = [[k, v] for k, v in environment().items() if k != "command"]
    return ["Where this report was written (the run recorded no run_info.json):", "", *_markdown_table(["", ""], rows)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return (["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _task_table(results: dict[str, dict]) -> list[str]:
    rows = [[name, r.get("items", "?"), _number(r["acc"]), _number(r["acc_norm"]) if "acc_norm" in r else "-",
             _number(r.get("chance", 0.0)), r.get("file", "")] for name, r in results.items()]
    return _markdown_table(["task", "items", "acc", "acc_norm", "chance", "from"], rows)


def compare(models: list[str | Path], tasks: list[str] | None = None, out: str | Path = "compare.md",
            few_shot: int | None = None, limit: int | None = None, data_root: str | Path | None = None,
            batch_size: int = 16, device: str = "auto", fresh: bool = False, overwrite: bool = False) -> Path:
    """A markdown table (and a bar plot beside it) of `models` (runs or model directories) on the same tasks:
    stored results where they cover a task, else scored here; without `tasks`, the stored ones only."""
    from commonlm.evaluate.tasks import limited, load_tasks

    out = Path(out)
    if out.exists() and not overwrite:
        raise already_exists("compare", out)
    if len(models) < 1:
        raise UserError("compare: give at least one run or model directory")
    if few_shot is not None and few_shot < 0 or limit is not None and limit < 1:
        raise UserError(f"compare: --few-shot must be >= 0 and --limit >= 1 (got {few_shot}, {limit})")
    loaded = [t for spec in tasks or [] for t in load_tasks(spec, data_root)]  # bad input before any model loads
    for model in models:
        if not Path(model).is_dir():
            raise UserError(f"compare: {model}: no such directory (give run or model directories)")
    columns: list[dict[str, dict]] = []
    notes = []
    for model in models:
        stored = {} if fresh else stored_results(model)
        if not loaded:
            if not stored:
                raise UserError(f"compare: {model} has no stored task results ({Path(model) / EVAL_DIR}/*.json); "
                                "give --task to score tasks here")
            columns.append(stored)
            continue
        have = {t.name: stored[t.name] for t in loaded
                if t.name in stored and stored[t.name].get("items") == len(limited(t.items, limit))}
        need = [t for t in loaded if t.name not in have]
        column = dict(have)
        if need:
            from commonlm.api import load

            for result in load(model, device=device).evaluate_tasks(need, few_shot, limit, batch_size):
                column[result.name] = {**result.as_dict(), "file": "scored here"}
        if have:
            files = sorted({r["file"] for r in have.values()})
            notes.append(f"{model}: {', '.join(have)} from {', '.join(files)}")
        columns.append(column)
    names = list(dict.fromkeys(name for column in columns for name in column))
    labels = _labels(models)
    header = ["task", "chance", *labels]
    rows = []
    for name in names:
        chance = next((c[name]["chance"] for c in columns if name in c and "chance" in c[name]), None)
        cells = [_cell(c.get(name)) for c in columns]
        rows.append([name, _number(chance) if chance is not None else "-", *cells])
    plot = _bars(names, labels, columns, out.parent / f"{out.stem}.png")
    lines = ["# Comparison", "", f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             + (f" · few-shot {few_shot}" if few_shot is not None else "") + (f" · limit {limit}" if limit else ""),
             "", "Each cell: acc / acc_norm (items). Chance: the expected score of answering at random.", "",
             *_markdown_table(header, rows), "", f"![accuracy side by side]({plot.name})", ""]
    lines += [f"- `{label}`: {model}" for label, model in zip(labels, models)] + [""]
    if notes:
        lines += ["Stored results used (`eval/*.json`; --fresh scores everything here):", "",
                  *[f"- {note}" for note in notes], ""]
    from commonlm.utils import atomic_write_text

    atomic_write_text(out, "\n".join(lines))
    return out


def _labels(models: list[str | Path]) -> list[str]:
    """Short column names: a run's name (the folder above final/), or the full path where names repeat."""
    names = []
    for model in models:
        path = Path(model).resolve()
        names.append(path.parent.name if path.name == "final" else path.name)
    return names if len(set(names)) == len(names) else [str(m) for m in models]


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    norm = f" / {result['acc_norm']:.4f}" if "acc_norm" in result else ""
    return f"{result['acc']:.4f}{norm} ({result.get('items', '?')})"


def _bars(names: list[str], labels: list[str], columns: list[dict[str, dict]], out: Path) -> Path:
    """Grouped bars: per task, each model's acc_norm where the task reports it (else acc); chance as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) * max(1, len(labels)) ** 0.5 + 2), 4), dpi=110)
    width = 0.8 / max(len(labels), 1)
    for j, (label, column) in enumerate(zip(labels, columns)):
        heights = [column[n].get("acc_norm", column[n]["acc"]) if n in column else math.nan for n in names]
        ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(names))], heights, width, label=label)
    for i, name in enumerate(names):
        chance = next((c[name]["chance"] for c in columns if name in c and c[name].get("chance")), None)
        if chance:
            ax.hlines(chance, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3
                  else "center", fontsize=8)
    ax.set_ylabel("accuracy (acc_norm where reported)")
    ax.set_ylim(0, 1)
    ax.set_title("dashed: chance")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)

