"""`commonlm eval MODEL --task ...` end to end on a rigged model directory (tests/evaluate/conftest.py)."""

import json

import pytest
import yaml

from commonlm.cli import main
from tests.evaluate.conftest import save_bigram, table, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    model = save_bigram(tmp_path / "model", table({"a": 2.0, " ": 2.0, "b": 0.0}))
    write_jsonl(tmp_path / "items.jsonl", [{"q": "x", "c": ["aaaa", "b"], "a": 0},
                                           {"q": "y", "c": ["b", "aaaa"], "a": 0},
                                           {"q": "z", "c": ["aaaa", "b"], "a": 1}])
    spec = {"data": "items.jsonl", "name": "mine", "prompt": "{q}:", "choices": "c", "answer": "a"}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    return model, tmp_path / "task.yaml"


def test_eval_task_end_to_end_with_chance_and_json(setup, tmp_path, capsys):
    model, task = setup
    assert main(["eval", str(model), "--task", str(task), "--dtype", "fp32", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "chance" in out and "mine" in out
    (result,) = json.loads((tmp_path / "r.json").read_text())
    # raw log-likelihood picks "b" every time, length-normalised "aaaa" (see test_scoring.py's hand computation)
    assert (result["items"], result["acc"], result["acc_norm"], result["chance"]) == (3, 2 / 3, 1 / 3, 0.5)
    assert [(p["where"].rsplit("/", 1)[1], p["pick"]) for p in result["per_item"]] == [
        ("items.jsonl:1", 1), ("items.jsonl:2", 0), ("items.jsonl:3", 1)]
    assert main(["eval", str(model), "--task", str(task), "--quantize", "int8", "--limit", "2",
                 "--json", str(tmp_path / "q.json")]) == 0
    (quantized,) = json.loads((tmp_path / "q.json").read_text())
    assert (quantized["items"], quantized["acc"], quantized["acc_norm"]) == (2, 0.5, 0.5)  # items 1 and 2


def test_eval_big_bench_directory_and_few_shot(setup, tmp_path, capsys):
    model, _ = setup
    folder = tmp_path / "bb" / "pick"
    folder.mkdir(parents=True)
    examples = [{"input": f"q{i}", "target_scores": {"aaaa": 1, "b": 0}} for i in range(4)]
    (folder / "task.json").write_text(json.dumps({"name": "pick", "examples": examples}))
    assert main(["eval", str(model), "--task", "bigbench:pick", "--data-root", str(tmp_path / "bb" / ".."),
                 "--few-shot", "2", "--dtype", "fp32"]) == 2  # no bigbench/ under that root
    (tmp_path / "root" / "bigbench").mkdir(parents=True)
    folder.rename(tmp_path / "root" / "bigbench" / "pick")
    assert main(["eval", str(model), "--task", "bigbench:pick", "--data-root", str(tmp_path / "root"),
                 "--few-shot", "2", "--dtype", "fp32"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bigbench:pick")][0]
    assert line.split()[1:5] == ["4", "0.0000", "1.0000", "0.5000"]


@pytest.mark.parametrize("flags, message", [
    ([], "give --data DIR"),
    (["--data", "x", "--task", "y.yaml"], "one of the two"),
    (["--task", "nonesuch"], "not a named task"),
    (["--task", "TASK", "--limit", "0"], "--limit >= 1"),
])
def test_eval_bad_flags_are_one_line_errors(setup, flags, message, capsys):
    model, task = setup
    flags = [str(task) if f == "TASK" else f for f in flags]
    assert main(["eval", str(model), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_bad_task_file_names_file_and_line(setup, tmp_path, capsys):
    model, task = setup
    write_jsonl(tmp_path / "items.jsonl", [{"q": "x", "c": ["aaaa", "b"], "a": 0}, {"q": "y", "c": ["b"], "a": 0}])
    assert main(["eval", str(model), "--task", str(task)]) == 2
    assert "items.jsonl:2: 1 choice(s)" in capsys.readouterr().err
