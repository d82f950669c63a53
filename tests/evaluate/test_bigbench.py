"""BIG-bench's task.json, hand-made in its shape: multiple choice via target_scores, generation via target,
subtask directories reported with their mean."""

import json

import pytest

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.bigbench import load_bigbench
from commonlm.evaluate.scoring import score_task, score_tasks
from tests.evaluate.conftest import bigram_model, table

TOK = Tokenizer.byte_level()
ANSWER_42 = {":": {" ": 5.0}, " ": {"4": 5.0}, "4": {"2": 5.0}, "2": {"\n": 5.0}, "\n": {"\n": 5.0}}


def write_task(folder, examples, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"name": folder.name, "description": "d", "keywords": [],
                                                  "examples": examples, **fields}))
    return folder


def test_multiple_choice_is_worded_and_scored_as_big_bench_does(tmp_path):
    examples = [{"input": "Pick one.", "target_scores": {"aaaa": 1, "b": 0}},
                {"input": "Again.", "target_scores": {"aaaa": 0, "b": 1, "ab": 0.5}}]
    (task,) = load_bigbench(write_task(tmp_path / "pick", examples, task_prefix="Choose.\n",
                                       preferred_score="multiple_choice_grade"))
    assert task.kind == "choice" and task.name == "bigbench:pick"
    first = task.items[0]
    assert first.context.startswith("\nQ: Pick one.\n  choice: ") and first.context.endswith("\nA: ")
    assert sorted(first.context.split("\n  choice: ")[1:])[0].startswith("aaaa")  # both choices listed
    assert first.choices == ["aaaa", "b"] and first.credit == [1.0, 0.0]
    assert task.prompt(task.items[1], 1) == "Choose.\n" + first.shot + "\n" + task.items[1].context
    assert first.shot == first.context + "aaaa"
    assert task.chance == pytest.approx((1 / 2 + 1.5 / 3) / 2)
    result = score_task(bigram_model(table({"a": 2.0, " ": 2.0, "b": 0.0})), TOK, task)
    # raw log-likelihood prefers " b" over " aaaa" and " ab"; per character, " aaaa"
    assert [p["pick"] for p in result.per_item] == [1, 1] and [p["pick_norm"] for p in result.per_item] == [0, 0]
    assert result.metrics == {"acc": 0.5, "acc_norm": 0.5}


def test_generative_targets_use_output_regex_and_any_target(tmp_path):
    examples = [{"input": "What is 6 times 7?", "target": "42"}, {"input": "What is 1 plus 1?", "target": ["2", "two"]},
                {"input": "Say 42", "target": ["x", "42"]}]
    (task,) = load_bigbench(write_task(tmp_path / "arith" / "task.json", examples, output_regex=r"[-+]?\d+")
                            .joinpath("task.json"))
    assert task.kind == "generate" and task.stop == ["\n\n", "\nQ:"]
    result = score_task(bigram_model(table({"z": 0.0}, ANSWER_42)), TOK, task)
    assert [p["answer"] for p in result.per_item] == ["42"] * 3 and result.metrics["acc"] == pytest.approx(2 / 3)


def test_both_kinds_in_one_example_follow_preferred_score(tmp_path):
    examples = [{"input": "1+1", "target": "2", "target_scores": {"2": 1, "3": 0}}] * 2
    (generate,) = load_bigbench(write_task(tmp_path / "a", examples, preferred_score="exact_str_match"))
    (choice,) = load_bigbench(write_task(tmp_path / "b", examples, preferred_score="multiple_choice_grade"))
    assert generate.kind == "generate" and choice.kind == "choice"


def test_subtasks_share_the_limit_and_are_reported_with_their_mean(tmp_path):
    family = tmp_path / "fam"
    write_task(family, [])  # the top task.json lists no examples of its own, as BIG-bench's arithmetic does
    write_task(family / "one", [{"input": f"q{i}", "target_scores": {"aaaa": 1, "b": 0}} for i in range(4)])
    write_task(family / "two", [{"input": f"q{i}", "target_scores": {"aaaa": 0, "b": 1}} for i in range(4)])
    tasks = load_bigbench(family)
    assert [t.name for t in tasks] == ["bigbench:fam/one", "bigbench:fam/two"]
    results = score_tasks(bigram_model(table({"a": 2.0, " ": 2.0, "b": 0.0})), TOK, tasks, limit=4)
    assert [(r.name, r.items, r.metrics["acc"]) for r in results] == [
        ("bigbench:fam/one", 2, 0.0), ("bigbench:fam/two", 2, 1.0), ("bigbench:fam (mean of 2)", 4, 0.5)]
    assert results[-1].chance == 0.5


@pytest.mark.parametrize("examples, message", [
    ([], "no examples"),
    ([{"input": "q", "target_scores": {"a": 1}}], "example 1: `target_scores` must map at least 2 choices"),
    ([{"target": "x"}], "example 1: an example is an object with an `input` text"),
    ([{"input": "q", "target": "1"}, {"input": "q", "target": 5}], "example 2: `target` must be a text"),
])
def test_bad_big_bench_tasks_name_the_example(tmp_path, examples, message):
    with pytest.raises(UserError, match=message):
        load_bigbench(write_task(tmp_path / "bad", examples) / "task.json")
