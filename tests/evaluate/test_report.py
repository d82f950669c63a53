"""`commonlm report RUN` and `commonlm compare A B ...`: what they read (metrics.jsonl, commonlm.yaml, stored task
results in eval/*.json), what they score themselves, and the files they write."""

import json

import pytest
import yaml

from commonlm.api import load
from commonlm.cli import main
from commonlm.config import load_config
from commonlm.errors import UserError
from commonlm.evaluate.report import stored_results
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from tests.evaluate.conftest import save_bigram, table, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
ITEMS = [{"q": "x", "c": ["aaaa", "b"], "a": 0}, {"q": "y", "c": ["b", "aaaa"], "a": 0},
         {"q": "z", "c": ["aaaa", "b"], "a": 1}]


def task_file(folder):
    write_jsonl(folder / "items.jsonl", ITEMS)
    spec = {"data": "items.jsonl", "name": "mine", "prompt": "{q}:", "choices": "c", "answer": "a"}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    return folder / "task.yaml"


@pytest.fixture(scope="module")
def run(byte_data, tmp_path_factory):
    config = load_config("tiny", ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=32",
                                  "train.micro_batch_size=4", "train.dtype=fp32", "train.log_every=1",
                                  "train.eval_every=3", "train.max_steps=6", "train.threads=1"])
    config.data.path = str(byte_data)
    out = tmp_path_factory.mktemp("report") / "run"
    train(config, out)
    return out


def test_report_of_a_run(run, tmp_path, capsys):
    task = task_file(tmp_path)
    assert main(["eval", str(run), "--task", str(task), "--dtype", "fp32", "--json", str(run / "eval" / "t.json")]) == 0
    (stored,) = json.loads((run / "eval" / "t.json").read_text())
    assert main(["report", str(run), "--prompt", "the ", "--max-tokens", "8", "--device", "cpu"]) == 0
    report = (run / "report.md").read_text()
    records = read_metrics(run)
    last_loss = [r for r in records if "loss" in r][-1]["loss"]
    last_val = [r for r in records if "val_loss" in r][-1]
    assert "| steps | 6 |" in report and f"| last train loss | {last_loss:.4f} |" in report
    assert f"Last validation (step {last_val['step']})" in report and f"| loss | {last_val['val_loss']:.4f} |" in report
    assert f"| mine | 3 | {stored['acc']:.4f} | {stored['acc_norm']:.4f} | {stored['chance']:.4f} | t.json |" in report
    for png in ("report-loss.png", "report-curves.png"):
        assert f"]({png})" in report and (run / png).read_bytes()[:8] == PNG
    sample = load(run, device="cpu").generate("the ", max_tokens=8, temperature=0.0)
    assert f'**"the "** →\n\n```text\nthe {sample}\n```' in report
    assert (run / "commonlm.yaml").read_text().rstrip() in report
    assert "## Hardware and code" in report and "torch" in report
    (start,) = json.loads((run / "run_info.json").read_text())  # the loop recorded its one start
    assert start["step"] == 0 and f"| torch | {start['torch']} |" in report and "The run's 1 start(s)" in report

    assert main(["report", str(run)]) == 2 and "already exists" in capsys.readouterr().err
    out = tmp_path / "elsewhere" / "r.md"
    assert main(["report", str(run), "--out", str(out), "--no-samples"]) == 0
    assert "## Samples" not in out.read_text() and (out.parent / "r-loss.png").read_bytes()[:8] == PNG


def test_report_of_something_else_is_a_one_line_error(tmp_path, capsys):
    model = save_bigram(tmp_path / "model", table({"a": 1.0}))
    assert main(["report", str(model)]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "Traceback" not in err


@pytest.fixture
def two_models(tmp_path):
    # raw log-likelihood picks " b" under `first` and length-normalised " aaaa" (tests/evaluate/test_cli_eval.py);
    # `second` gives "a" almost no probability, so both pick " b": items 2 and 3 are right
    first = save_bigram(tmp_path / "first", table({"a": 2.0, " ": 2.0, "b": 0.0}))
    second = save_bigram(tmp_path / "second", table({" ": 2.0, "b": 2.0}))
    return first, second, task_file(tmp_path)


def test_compare_scores_models_side_by_side(two_models, tmp_path, capsys):
    first, second, task = two_models
    out = tmp_path / "cmp" / "side.md"
    assert main(["compare", str(first), str(second), "--task", str(task), "--out", str(out), "--device", "cpu"]) == 0
    text = out.read_text()
    assert "| task | chance | first | second |" in text
    assert "| mine | 0.5000 | 0.6667 / 0.3333 (3) | 0.6667 / 0.6667 (3) |" in text
    assert (out.parent / "side.png").read_bytes()[:8] == PNG and "](side.png)" in text
    assert "| mine |" in capsys.readouterr().out  # printed too

    # a stored result for the same task and items is used instead of scoring; --fresh scores anyway
    (first / "eval").mkdir()
    (first / "eval" / "old.json").write_text(json.dumps([{"task": "mine", "items": 3, "acc": 0.125, "chance": 0.5}]))
    assert main(["compare", str(first), str(second), "--task", str(task), "--out", str(out), "--overwrite"]) == 0
    text = out.read_text()
    assert "| mine | 0.5000 | 0.1250 (3) | 0.6667 / 0.6667 (3) |" in text and "mine from old.json" in text
    assert main(["compare", str(first), "--task", str(task), "--out", str(out), "--overwrite", "--fresh"]) == 0
    assert "| mine | 0.5000 | 0.6667 / 0.3333 (3) |" in out.read_text()
    assert main(["compare", str(first), "--task", str(task), "--limit", "2", "--out", str(out), "--overwrite"]) == 0
    assert "0.1250" not in out.read_text()  # 2 items asked, 3 stored: scored here

    # without --task: the stored results only
    assert main(["compare", str(first), "--out", str(out), "--overwrite"]) == 0
    assert "| mine | 0.5000 | 0.1250 (3) |" in out.read_text()
    assert main(["compare", str(second), "--out", str(out), "--overwrite"]) == 2
    assert "no stored task results" in capsys.readouterr().err
    assert main(["compare", str(first), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_stored_results_later_file_wins_and_bad_files_are_named(tmp_path):
    (tmp_path / "eval").mkdir()
    old, new = tmp_path / "eval" / "a.json", tmp_path / "eval" / "b.json"
    old.write_text(json.dumps([{"task": "t", "acc": 0.1}, {"task": "u", "acc": 0.2}]))
    new.write_text(json.dumps([{"task": "t", "acc": 0.3}]))
    found = stored_results(tmp_path)
    assert (found["t"]["acc"], found["t"]["file"], found["u"]["acc"]) == (0.3, "b.json", 0.2)
    new.write_text("[{")
    with pytest.raises(UserError, match="b.json: not valid JSON"):
        stored_results(tmp_path)
    new.write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(UserError, match="b.json: not task results"):
        stored_results(tmp_path)
