"""Benchmark `commonlm data prepare` on the Python standard library: one worker vs all cores.

Trains a BPE tokenizer (vocab 8192) on the stdlib first (timed separately), then tokenizes the same corpus
into a temporary directory with workers=1 and workers=os.cpu_count(), and prints a small table.
Run: .venv/bin/python bench/data_prepare.py
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import tokenizers

from commonlm.data.prepare import prepare
from commonlm.data.sources import SourceStats, iter_texts
from commonlm.data.tokenizer import Tokenizer

VOCAB = 8192


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds() -> float:
    """User+system time of this process and of its finished child processes (the spawned workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    cores = os.cpu_count() or 1
    versions = f"python {platform.python_version()}, tokenizers {tokenizers.__version__}"
    print(f"machine: {cpu_name()}, {cores} cores; {versions}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = SourceStats()
        texts = list(iter_texts(["stdlib"], stats=stats))
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        tok = Tokenizer.train_bpe(texts, vocab_size=VOCAB)
        t_train = time.perf_counter() - t0
        tok.save(Path(tmp) / "tok")
        mb = stats.input_bytes / 1e6
        print(f"corpus: stdlib, {stats.documents} documents, {mb:.1f} MB (read in {t_read:.2f}s)")
        print(f"tokenizer: BPE vocab {VOCAB} trained in {t_train:.1f}s ({mb / t_train:.2f} MB/s)\n")
        rows = []
        for workers in sorted({1, cores}):
            cpu0 = cpu_seconds()
            s = prepare(["stdlib"], Path(tmp) / "tok", Path(tmp) / f"data-{workers}", workers=workers, progress=False)
            docs = s.train_documents + s.val_documents
            rows.append((workers, s.input_bytes / 1e6, s.train_tokens + s.val_tokens, s.seconds, s.mb_per_s,
                         docs / s.seconds, cpu_seconds() - cpu0))  # fmt: skip
    # cpu s: CPU time of this process and its workers; wall time also counts other load on the machine.
    print(f"\n{'workers':>7} {'MB':>7} {'tokens':>10} {'seconds':>8} {'MB/s':>7} {'docs/s':>8} {'cpu s':>7}")
    for workers, mb, tokens, seconds, mbps, dps, cpu in rows:
        print(f"{workers:>7} {mb:>7.1f} {tokens:>10,} {seconds:>8.2f} {mbps:>7.2f} {dps:>8.0f} {cpu:>7.2f}")


if __name__ == "__main__":
    main()
