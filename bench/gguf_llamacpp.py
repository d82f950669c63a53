"""Does llama.cpp run our GGUF files as we do? Greedy tokens and tokenization, ours vs llama.cpp.

    python3 -m venv /tmp/llcpp && /tmp/llcpp/bin/pip install llama-cpp-python numpy  # builds llama.cpp (minutes)
    export LLAMACPP_PYTHON=/tmp/llcpp/bin/python  # (or --llamacpp-python; default: this python)
    .venv/bin/python bench/gguf_llamacpp.py runs/quickstart/run/final [--tokens 48]
    .venv/bin/python bench/gguf_llamacpp.py random:qwen3_moe random:deepseek_v3 --quants f32 f16

Exports each model to GGUF (f32, f16, q8_0) with `commonlm export`'s code, loads each file in llama.cpp
(llama-cpp-python, run by the python given: llama.cpp may live in a venv of its own, without torch), and compares:
llama.cpp's tokenization of a sample text with ours, and its greedy continuation of a few prompts with ours (same
prompt ids, our fp32 decoding). `random:FAMILY` is a small random-weight model of that family (mixture of experts:
qwen3_moe, deepseek_v3; also llama, qwen3) with a BPE tokenizer trained on the standard library's source; a
random model's greedy tokens are a parity check as good as a trained one's. Prints a table of matching tokens and
the decode speed llama.cpp reaches on the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":  # (llama.cpp's python: no torch)
    llamacpp_worker(sys.argv[2], sys.argv[3])
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import machine, markdown_table  # noqa: E402

from commonlm.api import load  # noqa: E402
from commonlm.config import ModelConfig  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.infer.generate import generate_ids  # noqa: E402
from commonlm.interop.gguf_export import export_gguf  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402

SMALL = dict(n_layer=4, n_head=4, d_model=128, vocab_size=1024, max_seq_len=256, norm_eps=1e-6, tie_embeddings=False)
RANDOM = {
    "llama": dict(family="llama", n_kv_head=2),
    "qwen3": dict(family="qwen3", qk_norm=True, n_kv_head=2, head_dim=32),
    "qwen3_moe": dict(family="qwen3_moe", qk_norm=True, n_kv_head=2, head_dim=32, n_experts=8, experts_per_token=2,
                      expert_ff_dim=64),
    # latent attention (queries through a latent too), one dense block, then 8 experts in 4 groups (2 per token) and
    # a shared expert, sigmoid routing with a selection bias, DeepSeek-V3's routed scale
    "deepseek_v3": dict(family="deepseek_v3", d_ff=256, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=32,
                        qk_rope_head_dim=16, v_head_dim=32, n_experts=8, experts_per_token=2, expert_ff_dim=64,
                        n_shared_experts=1, router_score="sigmoid", router_bias=True, router_scale=2.5, expert_groups=4,
                        groups_per_token=2, dense_layers=1),
}


def random_model(family: str, seed: int = 0) -> tuple[Decoder, Tokenizer]:
    """A random-weight model of the family (every weight, norm and selection bias perturbed, so each tensor's place
    in the file matters) and a BPE tokenizer trained on some of the standard library's source."""
    stdlib = Path(json.__file__).parent.parent
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    tok = Tokenizer.train_bpe(texts, vocab_size=SMALL["vocab_size"] - 64)
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(**SMALL | RANDOM[family])).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=g) * 0.05)
    return model, tok


def compare(label: str, model: Decoder, tok: Tokenizer, quants: list[str], tokens: int, python: str) -> list[list]:
    prompts = [tok.encode(prompt) for prompt in PROMPTS]
    ours = [generate_ids(model, ids, max_tokens=tokens, temperature=0.0) for ids in prompts]
    pairs = [[ids, len(w)] for ids, w in zip(prompts, ours)]
    job = json.dumps({"n_ctx": model.config.max_seq_len, "prompts": pairs})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in quants:
            path = export_gguf(model, tok, Path(tmp) / f"m-{quant}.gguf", quant=quant)
            size = f"{path.stat().st_size / 1e6:.1f}"
            proc = subprocess.run([python, __file__, "--worker", str(path), job], capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "PYTHONPATH": ""})
            if proc.returncode != 0:
                said = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1][:120]
                rows.append([label, quant, size, "–", f"llama.cpp exited {proc.returncode}: {said}", "–"])
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            same_tokens = result["sample"] == tok.encode(SAMPLE)
            matched = total = made = 0
            for got, want in zip(result["continuations"], ours):
                prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                matched, total, made = matched + prefix, total + len(want), made + len(got)
            rows.append([label, quant, size, "yes" if same_tokens else "NO", f"{matched}/{total}",
                         f"{made / result['seconds']:.0f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run or model directories, or random:FAMILY "
                                             f"({', '.join(RANDOM)})")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--quants", nargs="+", default=["f32", "f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    p.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON", sys.executable),
                   help="a python that imports llama_cpp (default: this one, or $LLAMACPP_PYTHON)")
    args = p.parse_args()
    print(f"{machine()}; load {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    rows = []
    for name in args.models:
        if name.startswith("random:"):
            model, tok = random_model(name.removeprefix("random:"))
            label = f"{name} ({model.num_params() / 1e6:.1f}M)"
        else:
            lm = load(name, device="cpu")
            model, tok, label = lm.model, lm.tokenizer, f"{lm.path} ({lm.model.num_params() / 1e6:.1f}M)"
        rows += compare(label, model, tok, args.quants, args.tokens, args.llamacpp_python)
    print(f"greedy, {args.tokens} tokens x {len(PROMPTS)} prompts; 'matching' = tokens before the first difference "
          "from ours (fp32)\n")
    print(markdown_table(["model", "GGUF", "MB", "same tokenization", "matching greedy tokens", "llama.cpp tok/s"],
                         rows))


if __name__ == "__main__":
    main()
