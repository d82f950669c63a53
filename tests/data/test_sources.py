"""Sources: every input kind, what is skipped and counted, ordering, and the errors users see."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest

from commonlm.data.sources import SourceStats, iter_texts, list_items, read_item, split_items
from commonlm.errors import UserError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def texts(inputs, **kwargs) -> tuple[list[str], SourceStats]:
    stats = SourceStats()
    return list(iter_texts([str(i) for i in inputs], stats=stats, **kwargs)), stats


def test_text_files_are_one_document_each(tmp_path):
    a = write(tmp_path / "a.txt", "first\nfile\n")
    b = write(tmp_path / "b.py", "print('hi')\n")
    c = write(tmp_path / "data.weird", "no known suffix")  # named explicitly: still read
    docs, stats = texts([a, b, c])
    assert docs == ["first\nfile\n", "print('hi')\n", "no known suffix"]
    assert stats.documents == 3 and stats.input_bytes == sum(os.path.getsize(p) for p in (a, b, c))


def test_directory_is_recursive_sorted_and_skips_junk(tmp_path):
    write(tmp_path / "z.md", "zed")
    write(tmp_path / "sub" / "b.py", "bee")
    write(tmp_path / "sub" / "a.rst", "ay")
    write(tmp_path / ".hidden" / "h.txt", "hidden dir")
    write(tmp_path / ".dotfile.txt", "hidden file")
    write(tmp_path / "__pycache__" / "c.py", "cache")
    write(tmp_path / "img.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(tmp_path / "blob.txt", b"text then \x00 nul")  # binary despite its suffix
    docs, stats = texts([tmp_path])
    assert docs == ["ay", "bee", "zed"]  # sub/a.rst, sub/b.py, z.md
    assert stats.skipped_binary == 1


def test_include_globs_match_names_or_relative_paths(tmp_path):
    write(tmp_path / "a.py", "a")
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "pkg" / "c.py", "c")
    write(tmp_path / "pkg" / "d.c", "d")
    assert texts([tmp_path], include=["*.py"])[0] == ["a", "c"]
    assert texts([tmp_path], include=["*.c", "b.*"])[0] == ["b", "d"]
    assert texts([tmp_path], include=["pkg/*"])[0] == ["c", "d"]


def test_jsonl_counts_bad_lines_and_skips_them(tmp_path):
    lines = [
        json.dumps({"text": "one"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 3}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"text": "   "}),
        json.dumps({"text": "two", "meta": 1}),
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    docs, stats = texts([path])
    assert docs == ["one", "two"]
    assert stats.parse_errors == 4 and stats.skipped_empty == 1
    assert texts([path], text_field="body")[0] == ["no text field"]


def test_decode_errors_are_replaced_and_counted(tmp_path):
    a = write(tmp_path / "bad.txt", b"caf\xe9 ok")  # latin-1, not UTF-8
    b = write(tmp_path / "good.txt", "café ok")
    c = write(tmp_path / "bad.jsonl", b'{"text": "x\xff"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
    docs, stats = texts([a, b, c])
    assert docs == ["caf\ufffd ok", "café ok", "x\ufffd", "lone ? surrogate", "fine"]
    assert stats.decode_errors == 3
    for doc in docs:
        doc.encode("utf-8")  # every document is valid UTF-8 text


def test_nfc_normalization_and_whitespace_only_documents(tmp_path):
    a = write(tmp_path / "a.txt", "cafe\u0301")
    b = write(tmp_path / "b.txt", " \n\t \n")
    c = write(tmp_path / "c.txt", "")
    docs, stats = texts([a, b, c])
    assert docs == ["caf\u00e9"]
    assert stats.skipped_empty == 2


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table({"content": ["α first", None, "second", ""], "id": [1, 2, 3, 4]})
    pq.write_table(table, path, row_group_size=2)
    docs, stats = texts([path], text_field="content")
    assert docs == ["α first", "second"]
    assert stats.skipped_empty == 2
    with pytest.raises(UserError, match="no column 'text'.*content, id"):
        texts([path])
    # row groups as separate items read the same documents
    items = split_items(list_items([str(path)]), target_bytes=1)
    assert len(items) == 2
    assert [d for item in items for d in read_item(item, "content")] == docs


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = write(tmp_path / "d.parquet", b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UserError, match="pip install pyarrow"):
        texts([path])


def test_jsonl_byte_ranges_read_each_line_exactly_once(tmp_path):
    records = [{"text": f"doc {i} " + "é" * (i % 7)} for i in range(200)]
    path = write(tmp_path / "big.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    whole = list(read_item(list_items([str(path)])[0]))
    for target in (1, 7, 100, 1000):
        items = split_items(list_items([str(path)]), target_bytes=target)
        assert len(items) > 1
        stats = SourceStats()
        assert [d for item in items for d in read_item(item, stats=stats)] == whole
        assert stats.input_bytes == path.stat().st_size
    assert whole == [r["text"] for r in records]


def test_the_same_file_twice_is_read_once(tmp_path):
    a = write(tmp_path / "a.txt", "a")
    assert len(list_items([str(a), str(tmp_path), str(tmp_path / "." / "a.txt")])) == 1


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        texts([tmp_path / "nope.txt"])


def test_no_documents_is_a_user_error(tmp_path):
    write(tmp_path / "empty.txt", "   ")
    with pytest.raises(UserError, match="no documents"):
        texts([tmp_path])
    with pytest.raises(UserError, match="--include"):
        texts([tmp_path], include=["*.nothing"])
    with pytest.raises(UserError, match="no inputs"):
        texts([])


def test_stdlib_is_python_source_without_tests():
    items = list_items(["stdlib"])
    assert len(items) > 100
    assert all(i.path.endswith(".py") and i.kind == "text" for i in items)
    parts = {p for i in items for p in Path(i.path).parts}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}
    assert any(i.path.endswith(os.sep + "textwrap.py") for i in items)
    assert [i.path for i in items] == [i.path for i in list_items(["stdlib"])]  # deterministic
