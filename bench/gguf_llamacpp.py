"""Does llama.cpp run our GGUF files as we do? Greedy tokens and tokenization, ours vs llama.cpp.

    pip install llama-cpp-python        # builds llama.cpp from source (a few minutes on 2 cores)
    .venv/bin/python bench/gguf_llamacpp.py runs/quickstart/run/final [--tokens 48]

Exports the model to GGUF (f32, f16, q8_0) with `commonlm export`'s code, loads each file in llama.cpp
(llama-cpp-python), and compares: llama.cpp's tokenization of a sample text with ours, and its greedy
continuation of a few prompts with ours (same prompt ids). Prints a table of matching tokens and the
decode speed llama.cpp reaches on the file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table  # noqa: E402

from commonlm.api import load  # noqa: E402
from commonlm.infer.generate import generate_ids  # noqa: E402
from commonlm.interop.gguf_export import export_gguf  # noqa: E402

SAMPLE = "def main(argv=None):\n    \"\"\"Run it.\"\"\"\n    for i in range(10):  # count\n        print(f'{i:>3}')\n"
PROMPTS = ["def ", "import os\n", "class Config:\n    "]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run or model directory (Llama/Qwen/GPT-2 family)")
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("needs llama-cpp-python: pip install llama-cpp-python") from None
    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    lm = load(args.model, device="cpu")
    ours = {prompt: generate_ids(lm.model, lm.tokenizer.encode(prompt), max_tokens=args.tokens, temperature=0.0)
            for prompt in PROMPTS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f32", "f16", "q8_0"):
            path = export_gguf(lm.model, lm.tokenizer, Path(tmp) / f"m-{quant}.gguf", quant=quant)
            llm = Llama(str(path), n_ctx=lm.model.config.max_seq_len, n_threads=2, n_batch=256, verbose=False)
            same_tokens = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False) == lm.tokenizer.encode(SAMPLE)
            matched, total, seconds, made = 0, 0, 0.0, 0
            for prompt, want in ours.items():
                llm.reset()
                got = []
                t0 = time.perf_counter()
                for token in llm.generate(lm.tokenizer.encode(prompt), temp=0.0, top_k=1, repeat_penalty=1.0):
                    got.append(token)
                    if len(got) == len(want):
                        break
                seconds += time.perf_counter() - t0
                made += len(got)
                prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                matched += prefix
                total += len(want)
            rows.append([quant, f"{path.stat().st_size / 1e6:.1f}", "yes" if same_tokens else "NO",
                         f"{matched}/{total}", f"{made / seconds:.0f}"])
            del llm
    print(f"model {lm.path} ({lm.model.num_params() / 1e6:.1f}M params); greedy, {args.tokens} tokens x "
          f"{len(PROMPTS)} prompts; 'matching' = tokens before the first difference from ours (fp32)\n")
    print(markdown_table(["GGUF", "MB", "same tokenization", "matching greedy tokens", "llama.cpp tok/s"], rows))


if __name__ == "__main__":
    main()
