"""Shared fixtures: a small prepared corpus built from synthetic text (no network, no shared data)."""

import os
import random

import pytest
import torch

from commonlm.data.prepare import prepare
from commonlm.data.tokenizer import Tokenizer

WORDS = ("the model reads text and learns to predict the next token . def class return import "
         "for while if else print ( ) : = + - 0 1 2 3 data loss step").split()


def synthetic_corpus(directory, n_docs: int = 60, seed: int = 0):
    """Small text files with some structure (so a model can learn something)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(5, 15)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
        (directory / f"doc_{i:03d}.txt").write_text(f"# document {i}\n" + "\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """What commonlm remembers between runs (the measured matmul peak) goes to a temporary directory, not to the
    user's ~/.cache, for this process and the commands the tests start."""
    before = os.environ.get("COMMONLM_CACHE_DIR")
    os.environ["COMMONLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("COMMONLM_CACHE_DIR", None)
    else:
        os.environ["COMMONLM_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """A prepared data directory (byte tokenizer, ~30k tokens, 10% validation documents)."""
    root = tmp_path_factory.mktemp("bytedata")
    corpus = synthetic_corpus(root / "corpus")
    Tokenizer.byte_level().save(root / "tok")
    prepare([str(corpus)], root / "tok", root / "data", val_fraction=0.1, workers=1, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and avoids oversubscribing the cores under `pytest -n`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
