"""The task format: few-shot prompt assembly, the layouts' items, and one-line errors naming file and line."""

import pytest
import yaml
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from commonlm.data.tokenizer import EOT, Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.scoring import score_task
from commonlm.evaluate.tasks import limited, load_task_file, load_tasks
from tests.evaluate.conftest import bigram_model, table, write_jsonl


def make(tmp_path, records, name="task.yaml", **spec):
    write_jsonl(tmp_path / "items.jsonl", records)
    (tmp_path / name).write_text(yaml.safe_dump({"data": "items.jsonl", **spec}))
    return tmp_path / name


QA = {"prompt": "Q: {q}\nA:", "answer": "a", "layout": "generate"}


def test_few_shot_examples_are_drawn_deterministically_and_never_the_item_itself(tmp_path):
    records = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)]
    task = load_task_file(make(tmp_path, records, **QA, few_shot=5, description="Answer these.\n\n"))
    item = task.items[2]
    prompt = task.prompt(item)
    assert prompt.startswith("Answer these.\n\n") and prompt.endswith("\n\nQ: question 2\nA:")
    shots = prompt.removeprefix("Answer these.\n\n").split("\n\n")[:-1]
    assert sorted(shots) == sorted(f"Q: question {i}\nA: answer {i}" for i in (0, 1, 3, 4, 5))  # all but itself
    again = load_task_file(tmp_path / "task.yaml")
    assert again.prompt(again.items[2]) == prompt  # the same examples in every run
    fewer = [s.where for s in task.examples_for(item, 2)]
    assert len(fewer) == 2 and item.where not in fewer
    assert [task.prompt(i) for i in limited(task.items, 3)] == [task.prompt(task.items[i]) for i in (0, 2, 4)]
    with pytest.raises(UserError, match=r"items.jsonl:3: --few-shot 6 needs 6 other items"):
        task.prompt(item, 6)


def test_few_shot_same_draws_from_the_items_group_and_few_shot_from_another_file(tmp_path):
    records = [{"q": f"q{i}", "a": "x", "s": "ab"[i % 2]} for i in range(8)]
    task = load_task_file(make(tmp_path, records, **QA, few_shot=3, few_shot_same="s"))
    for item in task.items:
        assert all(shot.group == item.group for shot in task.examples_for(item, 3))
    write_jsonl(tmp_path / "train.jsonl", [{"q": "train q", "a": "train a"}])
    task = load_task_file(make(tmp_path, records, **QA, few_shot=1, few_shot_from="train.jsonl"))
    assert task.prompt(task.items[0]) == "Q: train q\nA: train a\n\nQ: q0\nA:"


def test_layouts_build_the_items_lm_evaluation_harness_would(tmp_path):
    arc = load_task_file(make(tmp_path, [{"question": "Sky?", "answerKey": "B",
                                          "choices": {"text": ["green", "blue"], "label": ["A", "B"]}}],
                              layout="arc"))
    assert arc.items[0].context == "Question: Sky?\nAnswer:" and arc.items[0].choices == [" green", " blue"]
    assert arc.items[0].credit == [0.0, 1.0] and arc.items[0].lengths == [5, 4]
    boolq = load_task_file(make(tmp_path, [{"passage": "P.", "question": "is it", "label": True}], layout="boolq"))
    assert boolq.items[0].choices == [" no", " yes"] and boolq.items[0].credit == [0.0, 1.0]
    piqa = load_task_file(make(tmp_path, [{"goal": "g", "sol1": "s1", "sol2": "s2", "label": 0}], layout="piqa"))
    assert piqa.items[0].choices == [" s1", " s2"] and piqa.items[0].shot == "Question: g\nAnswer: s1"
    hella = load_task_file(make(tmp_path, [{"activity_label": "Cooking", "ctx_a": "A man [title] stands.",
                                            "ctx_b": "he", "endings": ["a [step] b", "c", "d"], "label": "2"}],
                                layout="hellaswag"))
    assert hella.items[0].context == "Cooking: A man. stands. He" and hella.items[0].credit == [0.0, 0.0, 1.0]
    assert hella.items[0].choices == [" a b", " c", " d"]
    lambada = load_task_file(make(tmp_path, [{"text": "one two three"}], layout="lambada"))
    assert lambada.items[0].context == "one two" and lambada.items[0].targets == [" three"]


@pytest.mark.parametrize("records, spec, message", [
    ([{"q": "x"}], {"prompt": "{question}", "answer": "q"}, r"items.jsonl:1: no field 'question'"),
    ([{"q": "x", "c": ["a", "b"], "a": 0}, {"q": "y", "c": ["a", "b"], "a": 2}],
     {"prompt": "{q}", "choices": "c", "answer": "a"}, r"items.jsonl:2: answer 2 is out of range for 2 choices"),
    ([{"q": "x", "c": ["a", "b"]}], {"prompt": "{q}", "choices": "c", "answer": "a"}, r"items.jsonl:1: no field 'a'"),
    ([], {"prompt": "{q}", "answer": "q"}, r"items.jsonl: no items \(an empty task\)"),
    ([{"q": "x"}], {"answer": "q"}, r"task.yaml: no `prompt:`"),
    ([{"q": "x"}], {"prompt": "{q}", "answer": "q", "metric": "bleu"}, r"task.yaml: metric 'bleu'"),
    ([{"q": "x"}], {"prompt": "{q}", "answer": "q", "promt": "typo"}, r"task.yaml: unknown key 'promt'"),
    ([{"q": "x", "c": "ab", "a": 0}], {"prompt": "{q}", "choices": "c", "answer": "a"}, r"field 'c' must be a list"),
])
def test_bad_task_files_are_one_line_errors_naming_file_and_line(tmp_path, records, spec, message):
    with pytest.raises(UserError, match=message) as caught:
        load_task_file(make(tmp_path, records, **spec))
    assert "\n" not in str(caught.value)


def test_bad_json_and_bad_yaml_name_their_line(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"q": "x"}\n{"q": \n')
    (tmp_path / "task.yaml").write_text("data: items.jsonl\nprompt: '{q}'\nanswer: q\n")
    with pytest.raises(UserError, match=r"items.jsonl:2: not JSON"):
        load_task_file(tmp_path / "task.yaml")
    (tmp_path / "bad.yaml").write_text("data: items.jsonl\nprompt: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_task_file(tmp_path / "bad.yaml")


def test_a_prompt_the_tokenizer_cannot_encode_is_named(tmp_path):
    tk = HFTokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1, EOT: 2, ":": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(tk, pad_token=None, chat_template=None)
    path = make(tmp_path, [{"q": "a", "c": ["a", "a a"], "a": 0}, {"q": "b", "c": ["a", "a a"], "a": 0}],
                prompt="{q}:", choices="c", answer="a")
    with pytest.raises(UserError, match=r"items.jsonl:2: the model's tokenizer cannot encode"):
        score_task(bigram_model(table({"a": 1.0})), tokenizer, load_task_file(path))


def test_a_choice_longer_than_the_context_is_named(tmp_path):
    path = make(tmp_path, [{"q": "x", "c": ["a" * 40, "b"], "a": 1}], prompt="{q}:", choices="c", answer="a")
    with pytest.raises(UserError, match=r"items.jsonl:1: the choice or target ' aaaa.* alone is 41 tokens"):
        score_task(bigram_model(table({"a": 1.0}), max_seq_len=32), Tokenizer.byte_level(), load_task_file(path))


def test_named_tasks_need_a_data_root_and_never_download(tmp_path, monkeypatch):
    monkeypatch.delenv("COMMONLM_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no data root.*--data-root.*Nothing is ever downloaded"):
        load_tasks("mmlu")
    with pytest.raises(UserError, match="not a named task"):
        load_tasks("nonesuch")
    (tmp_path / "root" / "mmlu").mkdir(parents=True)
    write_jsonl(tmp_path / "root" / "mmlu" / "test.jsonl",
                [{"subject": "s", "question": "q", "choices": ["1", "2", "3", "4"], "answer": 1}])
    monkeypatch.setenv("COMMONLM_DATA_ROOT", str(tmp_path / "root"))
    (task,) = load_tasks("mmlu")
    assert task.name == "mmlu" and task.items[0].choices == [" A", " B", " C", " D"]
    with pytest.raises(UserError, match=r"no .*gsm8k/test.jsonl"):
        load_tasks("gsm8k")


def test_winogrande_scores_the_rest_of_the_sentence_after_each_filled_blank(tmp_path):
    records = [{"sentence": "It fell off the _ and broke.", "option1": "table", "option2": "shelf", "answer": a}
               for a in ("1", "2")]
    task = load_task_file(make(tmp_path, records, layout="winogrande"))
    item = task.items[0]
    assert item.contexts == ["It fell off the table", "It fell off the shelf"]
    assert item.choices == [" and broke."] * 2 and item.lengths == [21, 21]
    assert item.shot == "It fell off the table and broke." and task.items[1].credit == [0.0, 1.0]
    model = bigram_model(table({"x": 0.0}, {"e": {" ": 5.0}, "f": {" ": -5.0, "x": 5.0}}))  # " and": after "table"
    result = score_task(model, Tokenizer.byte_level(), task)
    assert [p["pick"] for p in result.per_item] == [0, 0] and result.metrics["acc"] == 0.5
    with pytest.raises(UserError, match=r"items.jsonl:1: the prompt 'no blank' has no blank"):
        load_task_file(make(tmp_path, [{**records[0], "sentence": "no blank"}], layout="winogrande"))
