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
import json
import subprocess
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


def llamacpp_worker(path: str, job: str) -> None:
    """Runs in its own process: llama.cpp and torch each bring an OpenMP runtime and crash together."""
    from llama_cpp import Llama

    spec = json.loads(job)
    llm = Llama(path, n_ctx=spec["n_ctx"], n_threads=2, n_batch=256, verbose=False)
    out = {"sample": llm.tokenize(SAMPLE.encode(), add_bos=False, special=False), "continuations": [], "seconds": 0.0}
    for prompt_ids, n in spec["prompts"]:
        llm.reset()
        got = []
        t0 = time.perf_counter()
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            got.append(token)
            if len(got) == n:
                break
        out["seconds"] += time.perf_counter() - t0
        out["continuations"].append(got)
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return llamacpp_worker(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run or model directory (Llama/Qwen/GPT-2 family)")
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    lm = load(args.model, device="cpu")
    prompts = [lm.tokenizer.encode(prompt) for prompt in PROMPTS]
    ours = [generate_ids(lm.model, ids, max_tokens=args.tokens, temperature=0.0) for ids in prompts]
    pairs = [[ids, len(w)] for ids, w in zip(prompts, ours)]
    job = json.dumps({"n_ctx": lm.model.config.max_seq_len, "prompts": pairs})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f32", "f16", "q8_0"):
            path = export_gguf(lm.model, lm.tokenizer, Path(tmp) / f"m-{quant}.gguf", quant=quant)
            proc = subprocess.run([sys.executable, __file__, "--worker", str(path), job], capture_output=True,
                                  text=True, timeout=600)
            if proc.returncode != 0:
                size = f"{path.stat().st_size / 1e6:.1f}"
                rows.append([quant, size, "–", f"llama.cpp exited {proc.returncode}", "–"])
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            same_tokens = result["sample"] == lm.tokenizer.encode(SAMPLE)
            matched = total = made = 0
            for got, want in zip(result["continuations"], ours):
                prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                matched, total, made = matched + prefix, total + len(want), made + len(got)
            rows.append([quant, f"{path.stat().st_size / 1e6:.1f}", "yes" if same_tokens else "NO",
                         f"{matched}/{total}", f"{made / result['seconds']:.0f}"])
    print(f"model {lm.path} ({lm.model.num_params() / 1e6:.1f}M params); greedy, {args.tokens} tokens x "
          f"{len(PROMPTS)} prompts; 'matching' = tokens before the first difference from ours (fp32)\n")
    print(markdown_table(["GGUF", "MB", "same tokenization", "matching greedy tokens", "llama.cpp tok/s"], rows))


if __name__ == "__main__":
    main()
