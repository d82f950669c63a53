"""`data prepare --format chat`: template parity with transformers, the loss mask, bad input, the reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from commonlm.data.chat import ChatData, prepare_chat, render
from commonlm.data.loader import TokenData
from commonlm.data.tokenizer import IM_END, Tokenizer
from commonlm.errors import UserError

CONVERSATIONS = [
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "def f(x):\n    return x"},
        {"role": "assistant", "content": "  spaces  and 東京 😀"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "done."},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"literal {IM_END} stays text"}],
]


@pytest.fixture(params=["bpe", "byte"])
def tok_dir(request, bpe_dir, byte_dir) -> Path:
    return bpe_dir if request.param == "bpe" else byte_dir


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def numbered(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer {i}."}]} for i in range(n)]  # fmt: skip


@pytest.mark.parametrize(
    "messages", [CONVERSATIONS[0], [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
)
def test_ids_equal_transformers_apply_chat_template(tok_dir, messages):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ids, _ = render(Tokenizer.load(tok_dir), messages)
    assert ids == list(hf.apply_chat_template(messages, tokenize=True, return_dict=False))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_mask_marks_assistant_contents_and_end_tokens(tok_dir, messages):
    tok = Tokenizer.load(tok_dir)
    ids, mask = render(tok, messages)
    assert len(mask) == len(ids)
    spans, current = [], []  # runs of masked tokens, decoded
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == [m["content"] + f"{IM_END}\n" for m in messages if m["role"] == "assistant"]


def test_prompt_completion_is_one_user_and_one_assistant_turn(tmp_path, byte_dir):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    prepare_chat([str(data)], byte_dir, tmp_path / "out", val_fraction=0)
    cd, tok = ChatData(tmp_path / "out"), Tokenizer.load(byte_dir)
    ids, mask = cd.conversation("train", 0)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert ids.tolist() == tok.encode_chat(messages, add_generation_prompt=False)
    assert tok.decode(ids[mask].tolist()) == f"4{IM_END}\n"


@pytest.mark.parametrize("line, says", [
    ("{not json", "not JSON"),
    ({"text": "hello"}, "no 'messages'"),
    ({"prompt": "only a prompt"}, "no 'messages'"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "content int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty assistant"),
    ({"prompt": "q", "completion": "  "}, "empty assistant"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "no assistant turn"),
])  # fmt: skip
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, byte_dir, line, says):
    data = write_jsonl(tmp_path / "bad.jsonl", numbered(2) + [line])
    with pytest.raises(UserError) as e:
        prepare_chat([str(data)], byte_dir, tmp_path / "out")
    assert f"{data}:3:" in str(e.value) and says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_round_trip_through_chat_data(tmp_path, tok_dir):
    records = [{"messages": m} for m in CONVERSATIONS] + numbered(30)
    data = write_jsonl(tmp_path / "c.jsonl", records + records[:3])  # three exact duplicates
    s = prepare_chat([str(data)], tok_dir, tmp_path / "out", val_fraction=0.2)
    tok, cd = Tokenizer.load(tok_dir), ChatData(tmp_path / "out")
    cd.check_tokenizer(tok)
    assert s.duplicates == 3 and s.val_split == "hash"
    assert cd.conversations("train") + cd.conversations("val") == len(records)
    assert cd.has_split("train") and cd.has_split("val")
    got = []
    for split in ("train", "val"):
        n_targets = 0
        for i in range(cd.conversations(split)):
            ids, mask = cd.conversation(split, i)
            assert ids.dtype == np.int64 and mask.dtype == bool
            got.append((ids.tolist(), mask.tolist()))
            n_targets += int(mask.sum())
        assert n_targets == cd.target_tokens(split)
    want = [tuple(render(tok, r["messages"])) for r in records]
    assert sorted(got) == sorted(want)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["format"] == "chat" and index["dtype"] == "uint16" and (tmp_path / "out" / "tokenizer.json").is_file()


def test_same_input_gives_the_same_files(tmp_path, byte_dir):
    data = write_jsonl(tmp_path / "c.jsonl", numbered(25))
    for out in ("a", "b"):
        prepare_chat([str(data)], byte_dir, tmp_path / out, val_fraction=0.2)
    for name in ("train_tokens.bin", "train_mask.bin", "train_offsets.bin", "val_tokens.bin", "val_mask.bin",
                 "val_offsets.bin", "tokenizer.json"):  # fmt: skip
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_few_conversations_still_get_a_val_split(tmp_path, byte_dir):
    data = write_jsonl(tmp_path / "c.jsonl", numbered(10))
    s = prepare_chat([str(data)], byte_dir, tmp_path / "out", val_fraction=0.2)
    cd = ChatData(tmp_path / "out")
    assert s.val_split == "tail" and cd.conversations("val") == 2 and cd.conversations("train") == 8
    ids, mask = cd.conversation("val", 1)
    assert Tokenizer.load(byte_dir).decode(ids[mask].tolist()) == f"answer 9.{IM_END}\n"


def test_readers_refuse_the_other_format(tmp_path, byte_dir):
    data = write_jsonl(tmp_path / "c.jsonl", numbered(3))
    prepare_chat([str(data)], byte_dir, tmp_path / "chat", val_fraction=0)
    with pytest.raises(UserError, match="chat data"):
        TokenData(tmp_path / "chat")
    with pytest.raises(UserError, match="--format chat"):
        ChatData(tmp_path)  # no index.json
    with pytest.raises(UserError, match="tokenizer"):
        ChatData(tmp_path / "chat").check_tokenizer(Tokenizer.train_bpe(["a b c"] * 4, vocab_size=300))


def test_cli_format_chat(tmp_path, byte_dir):
    from commonlm.cli import main

    data = write_jsonl(tmp_path / "c.jsonl", numbered(4))
    assert main(["data", "prepare", "--format", "chat", "--input", str(data), "--tokenizer", str(byte_dir),
                 "--out", str(tmp_path / "out"), "--val-fraction", "0.25"]) == 0  # fmt: skip
    assert ChatData(tmp_path / "out").conversations("val") == 1


def test_a_template_whose_prefixes_are_not_prefixes_is_refused(byte_dir):
    tok = Tokenizer.load(byte_dir)
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant:\\n'")
    with pytest.raises(UserError, match="not a prefix"):
        render(tok, CONVERSATIONS[1], "x.jsonl:1")
