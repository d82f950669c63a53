"""Shared fixtures for the data tests: small tokenizers and a synthetic corpus, built once per session."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest

from commonlm.data.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_FILES = ["textwrap.py", "json/encoder.py", "string.py"]

# Text that tends to break tokenizers: code, Unicode, emoji, whitespace runs, special-token lookalikes.
SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "class A:\n\tpass\r\n",
    "naïve café, Straße, ğ, 東京, Привет, مرحبا, ε = 0.1",
    "e\u0301 vs \u00e9",  # decomposed and composed é
    "emoji 😀👍🏽 👨‍👩‍👧 🇺🇳",
    "   leading spaces and trailing   \n\n\t\t  ",
    "literal <|endoftext|> in the corpus and <|im_start|>user",
    "x" * 300,
    "",
    "\x00\x01 control \u200b zero-width",
]


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct, varied documents of 20..400 characters."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "(", ")", "\n", "    ", "é", "東", "😀"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 80))) for i in range(n)]


def stdlib_texts() -> list[str]:
    return [(STDLIB / f).read_text(encoding="utf-8") for f in STDLIB_FILES]


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe")
    Tokenizer.train_bpe(stdlib_texts() + synthetic_docs(200) + SAMPLES, vocab_size=600).save(path)
    return path


@pytest.fixture(scope="session")
def byte_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("byte")
    Tokenizer.byte_level().save(path)
    return path


@pytest.fixture
def samples() -> list[str]:
    return list(SAMPLES)


@pytest.fixture
def make_docs():
    return synthetic_docs
