"""Passkey documents: seeded, the key at the depth asked for, within the length asked for; the `passkey:LEN` task
scored through the real scorer with a rigged model that always writes one key."""

import json
import random
import re

import pytest

from commonlm.data.passkey import (
    FILLER,
    KEY_LINE,
    QUESTION,
    copy_drill,
    passkey,
    passkey_task,
    passkeys,
    write_corpus,
)
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.scoring import answer_of, score_tasks
from commonlm.evaluate.tasks import limited, load_tasks
from commonlm.tune.rewards import exact
from tests.evaluate.conftest import bigram_model, table


def test_documents_are_seeded():
    assert passkeys(12, 400, seed=3) == passkeys(12, 400, seed=3)
    assert passkeys(12, 400, seed=3) != passkeys(12, 400, seed=4)
    assert passkeys(12, 400, seed=3, min_length=150) == passkeys(12, 400, seed=3, min_length=150)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_the_key_sits_at_the_depth_asked_for(depth):
    doc = passkey(2000, depth, random.Random(7))
    line = KEY_LINE.format(key=doc.key)
    assert re.fullmatch(r"\d{5}", doc.key) and doc.prompt.count(line) == 1
    assert doc.prompt.endswith(QUESTION) and doc.text == f"{doc.prompt} {doc.key}"
    before, after = doc.prompt.split(line)
    sentences_before = sum(before.count(s) for s in FILLER)
    sentences = sentences_before + sum(after.count(s) for s in FILLER)
    assert sentences > 50  # a long document: the depth is measured finely
    assert abs(sentences_before / sentences - depth) <= 0.5 / sentences
    assert doc.depth == sentences_before / sentences
    # and by characters: the key line starts `depth` of the way through the filler, within one sentence
    filler_chars = len(doc.prompt) - len(line) - len(QUESTION)
    assert abs(len(before) / filler_chars - depth) < max(len(s) for s in FILLER) / filler_chars


@pytest.mark.parametrize("length", [110, 256, 1000, 4096])
def test_documents_fill_the_length_asked_for_and_no_more(length):
    longest = max(len(s) for s in FILLER) + 1
    for doc in passkeys(11, length, seed=1):
        assert length - longest < len(doc.text) <= length
    for doc in passkeys(11, length, seed=1, room=8):  # evaluation: room left for the answer
        assert length - longest < len(doc.prompt) + 8 <= length


def test_documents_fit_a_length_in_tokens():
    tok = Tokenizer.train_bpe([" ".join(FILLER * 20), KEY_LINE.format(key="12345"), QUESTION], vocab_size=300)

    def count(text):
        return len(tok.encode(text))

    longest = max(count(" " + s) for s in FILLER)
    for doc in passkeys(11, 300, seed=2, count=count, room=8):
        assert 300 - longest < count(doc.prompt) + 8 <= 300
        assert len(doc.prompt) > 300  # BPE tokens hold several characters: more text fits


def test_too_short_a_length_is_a_user_error():
    with pytest.raises(UserError, match="holds no document"):
        passkey(50, 0.5, random.Random(0))


def test_corpus_for_data_prepare(tmp_path):
    path = write_corpus(tmp_path / "passkey.jsonl", 200, 256, seed=0)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(texts) == 200 and len(set(texts)) == 200
    assert all(len(t) <= 256 for t in texts) and min(len(t) for t in texts) < 150 < max(len(t) for t in texts)
    keys = [t.rsplit(" ", 1)[1] for t in texts]
    assert all(f"The pass key is {k}. Remember it." in t for t, k in zip(texts, keys))


def test_copy_drills_are_pairs_of_one_random_string_within_the_length():
    rng = random.Random(3)
    for length in (30, 100, 256, 1024):
        text = copy_drill(length, rng)
        assert len(text) <= length or text.count(" = ") == 1  # one pair at least, even past a tiny length
        pairs = re.findall(r"([a-z0-9]+) = ([a-z0-9]+)\.", text)
        assert pairs and all(a == b and 8 <= len(a) <= 24 for a, b in pairs)
        assert " ".join(f"{a} = {a}." for a, _ in pairs) == text
        assert len({a for a, _ in pairs}) == len(pairs)  # random: no string comes twice


def test_corpus_with_copy_drills(tmp_path):
    texts = [json.loads(line)["text"] for line in
             write_corpus(tmp_path / "mix.jsonl", 400, 256, seed=0, copies=0.25).read_text().splitlines()]
    drills = [t for t in texts if " = " in t]
    assert len(texts) == 400 and len(drills) == 100 and all(len(t) <= 256 for t in texts)
    assert all(re.fullmatch(r"([a-z0-9]+ = [a-z0-9]+\. ?)+", t) for t in drills)
    plain = [json.loads(line)["text"] for line in
             write_corpus(tmp_path / "plain.jsonl", 400, 256, seed=0).read_text().splitlines()]
    assert all(t == p for t, p in zip(texts, plain) if " = " not in t)  # the others: as without drills
    assert texts == [json.loads(line)["text"] for line in  # seeded
                     write_corpus(tmp_path / "again.jsonl", 400, 256, seed=0, copies=0.25).read_text().splitlines()]
    with pytest.raises(UserError, match="copies"):
        write_corpus(tmp_path / "bad.jsonl", 10, 256, copies=1.5)


def test_named_task_resolves_and_checks_the_digits():
    (task,) = load_tasks("passkey:1000")
    assert task.name == "passkey:1000" and task.kind == "generate" and not task.cut and task.chance == 0
    assert all(len(item.context) + task.max_tokens <= 1000 and re.fullmatch(r"\d{5}", item.targets[0])
               for item in task.items)
    depths = {float(item.where.split("depth ")[1].rstrip(")")) for item in task.items}
    assert min(depths) == 0.0 and max(depths) == 1.0 and len(depths) >= 10
    assert [i.context for i in load_tasks("passkey:1000")[0].items] == [i.context for i in task.items]  # seeded

    def score(completion, key):
        return exact(answer_of(completion, task.stop, task.output_regex), key)

    assert score(" 40721. Remember it.", "40721") == 1.0
    assert score(" 40721\nThe pass", "40721") == 1.0
    assert score(" 4072", "40721") == 0.0
    assert score(" 407213", "40721") == 0.0
    assert score(" 12345", "40721") == 0.0
    assert score(" the key", "40721") == 0.0
    for bad in ("passkey:", "passkey:abc", "passkey:0"):
        with pytest.raises(UserError, match="passkey:LEN"):
            passkey_task(bad)


def test_a_rigged_model_finds_exactly_the_items_with_its_key():
    """A bigram model that answers "is" with " 40721" (whatever the document): right on the items whose key
    that is, wrong on all others; the prompts of passkey:LEN fit a context of LEN."""
    (task,) = load_tasks("passkey:160")
    items = limited(task.items, 11)
    key = next(item.targets[0] for item in items if len(set(item.targets[0])) == 5)  # a chain of 5 bigrams
    chain = {"s": {" ": 0.0}, " ": {key[0]: 0.0}, **{a: {b: 0.0} for a, b in zip(key, key[1:])}, key[-1]: {"\n": 0.0}}
    model = bigram_model(table(default={"x": 0.0}, after=chain), max_seq_len=160).eval()
    (result,) = score_tasks(model, Tokenizer.byte_level(), [task], limit=11)
    assert result.truncated == 0
    assert [item["answer"] for item in result.per_item] == [key] * len(items)
    expected = sum(item.targets[0] == key for item in items) / len(items)
    assert expected > 0 and result.metrics["acc"] == expected


def test_a_prompt_longer_than_the_context_is_an_error_not_a_cut():
    model = bigram_model(table(default={"x": 0.0}), max_seq_len=128).eval()
    with pytest.raises(UserError, match="longer context"):
        score_tasks(model, Tokenizer.byte_level(), load_tasks("passkey:256"), limit=2)
