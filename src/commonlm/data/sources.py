"""Where documents come from: text and code files, directories, JSONL, Parquet, and the Python stdlib.

Inputs are first resolved into `SourceItem`s (a file, or a byte range / row-group range of a big one):
that list is the unit of parallel work for `prepare`, and reading the items in list order gives every
document in one deterministic order. Every document is decoded as UTF-8 (undecodable bytes replaced and
counted), NFC-normalized, and skipped if it is only whitespace. No torch here: workers must start fast.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

from commonlm.errors import UserError

STDLIB = "stdlib"  # the special input name for this Python's standard library
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
# Taken from a directory when no --include is given. JSON is left out: it is mostly data, not text.
TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc",
    ".py", ".pyi", ".pyx", ".ipynb", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",
    ".rs", ".go", ".java", ".kt", ".scala", ".swift", ".cs", ".fs", ".m", ".dart", ".zig", ".nim",
    ".js", ".jsx", ".mjs", ".ts", ".tsx", ".vue", ".svelte", ".rb", ".php", ".pl", ".lua", ".r", ".jl",
    ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".el", ".vim", ".sh", ".bash", ".zsh", ".fish", ".ps1",
    ".sql", ".html", ".htm", ".css", ".scss", ".xml", ".svg", ".yaml", ".yml", ".toml", ".ini", ".cfg",
    ".cmake", ".mk", ".proto", ".graphql",
}  # fmt: skip
TEXT_NAMES = {"Makefile", "Dockerfile", "README", "LICENSE", "CHANGELOG", "NOTICE"}
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}
# tests, and `encodings/`: 4 MB of generated codec tables that would drown the code in the quickstart corpus
STDLIB_SKIP_DIRS = SKIP_DIRS | {"test", "tests", "idle_test", "encodings"}
BINARY_SNIFF = 8192  # a NUL byte in this many leading bytes marks a file as binary


@dataclass(frozen=True)
class SourceItem:
    """One unit of reading work. jsonl: lines *starting* in bytes [start, stop); parquet: row groups
    [start, stop); text: the whole file. stop=-1 means to the end. `size` is the input bytes covered."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    start: int = 0
    stop: int = -1
    size: int = 0


@dataclass
class SourceStats:
    """What reading saw; merged across items and workers."""

    documents: int = 0  # non-empty documents yielded
    decode_errors: int = 0  # documents that had undecodable bytes (replaced by U+FFFD)
    skipped_empty: int = 0  # empty or whitespace-only documents
    skipped_binary: int = 0  # files that looked binary (NUL bytes)
    parse_errors: int = 0  # jsonl lines that were not JSON objects with a string text field
    input_bytes: int = 0  # raw bytes read

    def merge(self, other: SourceStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ---------------------------------------------------------------------------------------------------
# Inputs -> items


def list_items(inputs: list[str], include: list[str] | None = None) -> list[SourceItem]:
    """Every file the inputs name, one item per file: inputs in the order given, directories sorted."""
    if not inputs:
        raise UserError("data: no inputs given; pass files, directories, .jsonl/.parquet files or 'stdlib'")
    items, seen = [], set()
    for name in inputs:
        if name == STDLIB and not Path(name).exists():
            root = Path(sysconfig.get_paths()["stdlib"])
            files = _walk(root, include or ["*.py"], STDLIB_SKIP_DIRS)
        else:
            path = Path(name).expanduser()
            if not path.exists():
                raise UserError(f"data: input '{name}' does not exist; check the path (or use 'stdlib' for Python's)")
            files = _walk(path, include, SKIP_DIRS) if path.is_dir() else [path]
        for file in files:
            key = os.path.realpath(file)
            if key not in seen:
                seen.add(key)
                items.append(SourceItem(str(file), _kind(file), size=file.stat().st_size))
    return items


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def _walk(root: Path, include: list[str] | None, skip_dirs: set[str]) -> list[Path]:
    """Files under root, recursively, sorted; hidden entries and `skip_dirs` are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if _wanted(path, path.relative_to(root).as_posix(), include):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _wanted(path: Path, rel: str, include: list[str] | None) -> bool:
    if include:  # a pattern with a slash matches the path relative to the directory, else the name
        return any(fnmatch.fnmatchcase(rel if "/" in pat else path.name, pat) for pat in include)
    suffix = path.suffix.lower()
    return suffix in TEXT_SUFFIXES or suffix in JSONL_SUFFIXES or suffix in PARQUET_SUFFIXES or path.name in TEXT_NAMES


def split_items(items: list[SourceItem], target_bytes: int) -> list[SourceItem]:
    """Cut big jsonl files into byte ranges and parquet files into row-group ranges of ~target_bytes."""
    out = []
    for item in items:
        if item.kind == "jsonl" and item.size > target_bytes:
            starts = range(0, item.size, target_bytes)
            out += [
                replace(item, start=s, stop=min(s + target_bytes, item.size), size=min(target_bytes, item.size - s))
                for s in starts
            ]
        elif item.kind == "parquet" and item.size > target_bytes:
            meta = _parquet_file(item.path).metadata
            sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
            start, acc = 0, 0
            for i, size in enumerate(sizes):
                acc += size
                if acc >= target_bytes or i == len(sizes) - 1:
                    share = item.size * acc // max(1, sum(sizes))
                    out.append(replace(item, start=start, stop=i + 1, size=share))
                    start, acc = i + 1, 0
        else:
            out.append(item)
    return out


# ---------------------------------------------------------------------------------------------------
# Items -> documents


def read_item(item: SourceItem, text_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """The documents of one item, cleaned (see `clean_text`); what was skipped is counted in `stats`."""
    stats = stats if stats is not None else SourceStats()
    if item.kind == "jsonl":
        raw = _read_jsonl(item, text_field, stats)
    elif item.kind == "parquet":
        raw = _read_parquet(item, text_field, stats)
    else:
        raw = _read_text(item, stats)
    for text in raw:
        text = clean_text(text, stats)
        if text is not None:
            stats.documents += 1
            yield text


def clean_text(text: str, stats: SourceStats) -> str | None:
    """NFC-normalize; None for a whitespace-only document. Lone surrogates (from JSON escapes) count
    as decode errors and are replaced, so every document encodes to UTF-8."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            stats.decode_errors += 1
            text = text.encode("utf-8", errors="replace").decode("utf-8")
        text = unicodedata.normalize("NFC", text)
    if not text.strip():
        stats.skipped_empty += 1
        return None
    return text


def _decode(data: bytes, stats: SourceStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.decode_errors += 1
        return data.decode("utf-8", errors="replace")


def _read_text(item: SourceItem, stats: SourceStats) -> Iterator[str]:
    data = _read_bytes(item.path)
    stats.input_bytes += len(data)
    if b"\0" in data[:BINARY_SNIFF]:
        stats.skipped_binary += 1
        return
    text = _decode(data, stats)
    yield text[1:] if text.startswith("\ufeff") else text


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"data: cannot read {path} ({e.strerror})") from e


def _read_jsonl(item: SourceItem, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        f = open(item.path, "rb")
    except OSError as e:
        raise UserError(f"data: cannot read {item.path} ({e.strerror})") from e
    with f:
        if item.start > 0:  # skip the line that began before our range: it belongs to the previous item
            f.seek(item.start - 1)
            f.readline()
        while item.stop < 0 or f.tell() < item.stop:
            line = f.readline()
            if not line:
                break
            stats.input_bytes += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, stats))
            except ValueError:
                stats.parse_errors += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.parse_errors += 1
                continue
            yield text


def _parquet_file(path: str):  # -> pyarrow.parquet.ParquetFile
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"data: reading {path} needs pyarrow: pip install pyarrow") from e
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"data: {path} is not a readable parquet file ({e})") from e


def _read_parquet(item: SourceItem, text_field: str, stats: SourceStats) -> Iterator[str]:
    pf = _parquet_file(item.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"data: {item.path} has no column '{text_field}' (columns: {', '.join(names)}); "
                        "pick one with --text-field")  # fmt: skip
    stop = pf.metadata.num_row_groups if item.stop < 0 else item.stop
    groups = list(range(item.start, stop))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                stats.input_bytes += len(value)
                value = _decode(value, stats)
            elif isinstance(value, str):
                stats.input_bytes += len(value.encode("utf-8", errors="replace"))
            if value is None:
                stats.skipped_empty += 1
            elif not isinstance(value, str):
                stats.parse_errors += 1
            else:
                yield value


def iter_texts(
    inputs: list[str],
    include: list[str] | None = None,
    text_field: str = "text",
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Every document's text in a deterministic order (for tokenizer training). UserError if none."""
    stats = stats if stats is not None else SourceStats()
    for item in list_items(inputs, include):
        yield from read_item(item, text_field, stats)
    if stats.documents == 0:
        raise no_documents_error(inputs, include, text_field)


def no_documents_error(inputs: list[str], include: list[str] | None, text_field: str) -> UserError:
    where = ", ".join(inputs)
    hint = f"--include {' '.join(include)} matched nothing, " if include else ""
    return UserError(
        f"data: no documents in {where} ({hint}files are empty or binary, "
        f"or jsonl/parquet records lack the '{text_field}' field: set --text-field)"
    )
