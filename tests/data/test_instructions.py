"""The instruction set built from the standard library: deterministic, multi-turn, true to the docstrings and
signatures it quotes, and every conversation accepted by `prepare_chat`."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys

import pytest

from commonlm.data.chat import prepare_chat
from commonlm.data.instructions import (
    FOLLOW,
    MAX_DOC,
    SUMMARY_CHARS,
    build_instructions,
    entries,
    stdlib_modules,
)
from commonlm.utils import write_jsonl
from tests.procs import run_captured


@pytest.fixture(scope="module")
def library():
    return entries(stdlib_modules())


@pytest.fixture(scope="module")
def records():
    return build_instructions(seed=0)


def test_the_same_for_a_seed_whatever_the_caller_imported_and_no_side_effects():
    import torch  # noqa: F401  (it replaces inspect.getfile; pytest has replaced pdb.set_trace)

    here = build_instructions(seed=0, limit=600)
    assert build_instructions(seed=0, limit=600) == here
    assert build_instructions(seed=1, limit=600) != here
    assert "antigravity" not in sys.modules and "this" not in sys.modules  # never imported: side effects
    fresh = run_captured([sys.executable, "-m", "commonlm.data.instructions"])  # what build_instructions reads
    assert fresh.returncode == 0, fresh.stderr
    read = json.loads(fresh.stdout)  # nothing but the JSON: what modules print on import is swallowed
    names = {e["name"] for e in read}
    assert "inspect.getfile" in names and "pdb.set_trace" not in names  # the library's own, not the patches
    assert len(read) > 3000 and {"json", "inspect.getsource", "json.dumps", "len", "str.split"} <= names


def test_a_few_thousand_multi_turn_conversations(records):
    assert 3000 <= len(records) <= 4000
    turns = [sum(m["role"] == "user" for m in r["messages"]) for r in records]
    assert sum(t >= 2 for t in turns) > len(records) / 2 and max(turns) >= 4
    asked = [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]
    for kind in ("args", "example", "more", "members", "where"):
        assert any(q in FOLLOW[kind] for q in asked), kind
    assert len(set(asked)) > len(records) / 2  # varied phrasings of questions about many things
    for r in records:
        messages = r["messages"]
        body = messages[1:] if messages[0]["role"] == "system" else messages
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
        assert all(m["content"].strip() for m in messages)


def test_no_private_names_and_answers_from_real_docstrings(library):
    assert len({e.module for e in library}) > 150
    for e in library:
        assert not any(part.startswith("_") for part in e.name.split(".")), e.name
        assert SUMMARY_CHARS[0] <= len(e.summary) <= SUMMARY_CHARS[1]
        obj = _resolve(e.name, e.module)
        doc = inspect.getdoc(obj) if e.kind != "module" else obj.__doc__
        assert doc and len(obj.__doc__) <= MAX_DOC, e.name
        words = re.findall(r"[a-z]{4,}", e.summary.lower())  # the answer is the docstring's text (less its markup)
        assert sum(w in doc.lower() for w in words) >= 0.9 * len(words), e.name
        assert (e.example is not None) <= (">>>" in doc), e.name
        if e.example is not None:  # an example is given only where the docstring has it, verbatim
            assert all(line.strip() in doc for line in e.example.splitlines()), e.name


def test_arguments_are_the_signature(library):
    by_name = {e.name: e for e in library}
    for name in ("json.dumps", "os.path.join", "textwrap.wrap", "shutil.copyfile"):
        e = by_name[name]
        assert e.call == name + str(inspect.signature(_resolve(name, e.module)))
        assert len(e.params) == len(inspect.signature(_resolve(name, e.module)).parameters)
    method = by_name["str.split"]
    assert method.kind == "method" and method.call == ".split" + str(inspect.signature("".split))


def test_conversations_fit_the_budget():
    records = build_instructions(seed=3, limit=500, max_chars=400)
    assert len(records) > 300
    assert all(sum(len(m["content"]) for m in r["messages"]) <= 400 for r in records)


def test_every_conversation_prepares(records, tmp_path, bpe_dir):
    write_jsonl(tmp_path / "instructions.jsonl", records)
    summary = prepare_chat([str(tmp_path / "instructions.jsonl")], bpe_dir, tmp_path / "data")
    assert summary.conversations_seen == len(records)
    assert summary.train_target_tokens > summary.train_tokens / 3  # the answers carry the loss


def _resolve(name: str, module: str) -> object:
    """The object an entry is about, looked up afresh by its name."""
    if name == module:
        return importlib.import_module(module)
    obj = importlib.import_module(module)
    rest = name if module == "builtins" else name[len(module) + 1 :]
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj
