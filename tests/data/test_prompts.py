"""Prompts data for GRPO: rendered with the chat template plus the generation prompt, answers kept as text,
duplicates dropped, bad lines one-line errors naming file:line, and the CLI verb writes the same directory."""

import json

import pytest

from commonlm.data.arithmetic import problems, prompt_records
from commonlm.data.chat import ChatData, prepare_chat
from commonlm.data.prompts import PromptData, prepare_prompts
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.utils import write_jsonl


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.byte_level().save(path)
    return path


def test_prompts_are_rendered_with_the_generation_prompt(tok_dir, tmp_path):
    tok = Tokenizer.load(tok_dir)
    records = [{"prompt": "2+3", "answer": "5"},
               {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "7*6"}],
                "answer": 42},
               {"prompt": "2+3", "answer": "5"}]  # a duplicate
    index = prepare_prompts([str(write_jsonl(tmp_path / "p.jsonl", records))], tok_dir, tmp_path / "out",
                            val_fraction=0)
    assert index["stats"] == {"prompts_seen": 3, "duplicates": 1}
    data = PromptData(tmp_path / "out")
    data.check_tokenizer(tok)
    first, second = data.prompts("train")
    assert first.ids == tok.encode_chat([{"role": "user", "content": "2+3"}], add_generation_prompt=True)
    assert tok.decode(first.ids).endswith("<|im_start|>assistant\n")
    assert (first.prompt, first.answer) == ("2+3", "5")
    assert second.ids == tok.encode_chat([{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "7*6"}], add_generation_prompt=True)
    assert (second.prompt, second.answer) == ("7*6", "42")
    assert not data.has_split("val")



def test_text_with_unicode_line_separators_reads_back(tok_dir, tmp_path):
    """U+2028 and friends are stored as they are (not escaped): a reader that split on them saw broken lines."""
    records = [{"prompt": "one\u2028two\x85three", "answer": "4\u2029"}, {"prompt": "plain", "answer": "1"}]
    prepare_prompts([str(write_jsonl(tmp_path / "p.jsonl", records))], tok_dir, tmp_path / "out", val_fraction=0)
    read = PromptData(tmp_path / "out").prompts("train")
    assert [(p.prompt, p.answer) for p in read] == [("one\u2028two\x85three", "4\u2029"), ("plain", "1")]

def test_validation_split_and_the_cli(tok_dir, tmp_path, capsys):
    from commonlm.cli import main

    items = problems(200, seed=3, digits=2)
    path = write_jsonl(tmp_path / "p.jsonl", prompt_records(items))
    assert main(["data", "prepare", "--format", "prompts", "--input", str(path), "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "out"), "--val-fraction", "0.2"]) == 0
    data = PromptData(tmp_path / "out")
    train, val = data.prompts("train"), data.prompts("val")
    unique = {(p.question, p.answer) for p in items}
    assert len(train) + len(val) == len(unique) and 0.1 < len(val) / len(unique) < 0.3
    assert {(p.prompt, p.answer) for p in train + val} == unique
    assert "Prepared prompts" in capsys.readouterr().err


@pytest.mark.parametrize("line, match", [
    ({"prompt": "hi"}, "p.jsonl:2: 'answer' must be a non-empty string"),
    ({"prompt": "hi", "answer": " "}, "p.jsonl:2: 'answer' must be"),
    ({"answer": "1"}, "p.jsonl:2: expected a JSON object with 'prompt'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "1"},
     "p.jsonl:2: the conversation ends with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "a"}], "answer": "1"}, "p.jsonl:2: message 0 has role 'robot'"),
    ("{oops", "p.jsonl:2: not JSON"),
])
def test_bad_lines_are_one_line_errors(tok_dir, tmp_path, line, match):
    text = json.dumps({"prompt": "1+1", "answer": "2"}) + "\n" + (line if isinstance(line, str) else json.dumps(line))
    (tmp_path / "p.jsonl").write_text(text + "\n")
    with pytest.raises(UserError, match=match) as e:
        prepare_prompts([str(tmp_path / "p.jsonl")], tok_dir, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_prompts_and_chat_data_are_told_apart(tok_dir, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}])
    prepare_prompts([str(tmp_path / "p.jsonl")], tok_dir, tmp_path / "prompts")
    with pytest.raises(UserError, match="is not chat data"):
        ChatData(tmp_path / "prompts")
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "1+1", "completion": "2"}])
    prepare_chat([str(tmp_path / "c.jsonl")], tok_dir, tmp_path / "chat")
    with pytest.raises(UserError, match="is not prompts data"):
        PromptData(tmp_path / "chat")
    with pytest.raises(UserError, match="already exists"):
        prepare_prompts([str(tmp_path / "p.jsonl")], tok_dir, tmp_path / "prompts")
