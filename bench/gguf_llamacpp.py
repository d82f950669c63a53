"""Does llama.cpp run our GGUF files as we do? Greedy tokens and tokenization, ours vs llama.cpp.

    python3 -m venv /tmp/llcpp && /tmp/llcpp/bin/pip install llama-cpp-python numpy  # builds llama.cpp (minutes)
    export LLAMACPP_PYTHON=/tmp/llcpp/bin/python  # (or --llamacpp-python; default: this python)
    .venv/bin/python bench/gguf_llamacpp.py runs/quickstart/run/final [--tokens 48]
    .venv/bin/python bench/gguf_llamacpp.py random:qwen3_moe random:deepseek_v3 --quants f32 f16

Exports each model to GGUF (f32, f16, q8_0) with `commonlm export`'s code, loads each file in llama.cpp
(llama-cpp-python, run by the python given: llama.cpp may live in a venv of its own, without torch), and compares:
llama.cpp's tokenization of a sample text with ours, and its greedy continuation of a few prompts with ours (same
prompt ids, our fp32 decoding). `random:FAMILY` is a small random-weight model of that family (mixture of experts:
qwen3_moe, deepseek_v3, each also +yarn; llama, qwen3) with a BPE tokenizer trained on the standard library's source; a
random model's greedy tokens are a parity check as good as a trained one's. Prints a table of matching tokens and
the decode speed llama.cpp reaches on the file.
"""

from __future__ import annotations

import argparse
import copy
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
    # (an f32 KV cache: llama.cpp's default f16 one would add its own rounding to the file's)
    llm = Llama(path, n_ctx=spec["n_ctx"], n_threads=2, n_batch=256, logits_all=True, type_k=0, type_v=0,
                verbose=False)
    out = {"sample": llm.tokenize(SAMPLE.encode(), add_bos=False, special=False), "continuations": [], "seconds": 0.0,
           "logits": []}
    for ids in spec["sequences"]:  # teacher-forced: the logits at every position of a given sequence
        llm.reset()
        llm.eval(ids)
        out["logits"].append(llm.scores[: len(ids)].tolist())
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
from common import machine, markdown_table  # noqa: E402, I001  (first: it sets the environment torch reads)
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

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
# YaRN past a short original context (the prompts and continuations run to ~55 positions): Qwen's way (the cos/sin
# factor from the scale) and DeepSeek's (mscale = mscale_all_dim: the softmax scale instead)
YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_len=16)
RANDOM |= {"qwen3_moe+yarn": RANDOM["qwen3_moe"] | YARN,
           "deepseek_v3+yarn": RANDOM["deepseek_v3"] | YARN | dict(rope_attention_factor=1.0, rope_mscale_all_dim=1.0)}


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


def rounded(t: torch.Tensor, quant: str) -> torch.Tensor:
    """A weight rounded as the file stores it: q8_0 blocks along the last dimension where it is a multiple of 32,
    f16 otherwise."""
    data = t.detach().float().numpy()
    if quant == "q8_0" and data.shape[-1] % 32 == 0:
        data = gguf.quants.dequantize(gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float16).astype(np.float32)).reshape(t.shape)


def as_stored(model: Decoder, quant: str) -> Decoder:
    """Our model on the numbers an f16 or q8_0 file holds (matrices rounded; norms, biases and routers f32 as
    written), so llama.cpp's greedy tokens can also be compared with ours on the same weights. Latent attention's
    kv_b is stored as its key part transposed and its value part, and rounded so."""
    if quant == "f32":
        return model
    c, out = model.config, copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() < 2 or name.endswith(".router.weight"):
                continue
            if name.endswith(".attn.kv_b.weight"):
                k, v = p.unflatten(0, (c.n_head, -1)).split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
                k = rounded(k.transpose(1, 2), quant).transpose(1, 2)
                p.copy_(torch.cat([k, rounded(v, quant)], dim=1).flatten(0, 1))
            else:
                p.copy_(rounded(p, quant))
    return out


def matching(got: list[list[int]], want: list[list[int]]) -> str:
    """Tokens before the first difference, summed over the prompts, of all `want` holds."""
    same = sum(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
               for g, w in zip(got, want))
    return f"{same}/{sum(len(w) for w in want)}"


def forced(got: list[np.ndarray], want: list[np.ndarray], spread: float) -> str:
    """Teacher-forced logits against ours: positions with the same top token; the largest |difference| over the
    standard deviation of our logits."""
    top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, want))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    return f"{top1}/{sum(len(b) for b in want)}; {worst / spread:.1e}"


def compare(label: str, model: Decoder, tok: Tokenizer, quants: list[str], tokens: int, python: str) -> list[list]:
    prompts = [tok.encode(prompt) for prompt in PROMPTS]
    ours = [generate_ids(model, ids, max_tokens=tokens, temperature=0.0) for ids in prompts]
    pairs = [[ids, len(w)] for ids, w in zip(prompts, ours)]
    sequences = [ids + w for ids, w in zip(prompts, ours)]  # (each prompt and our greedy continuation)
    with torch.no_grad():
        logits = [model(torch.tensor([seq]))[0][0].numpy() for seq in sequences]
    spread = float(np.concatenate(logits).std())
    job = json.dumps({"n_ctx": model.config.max_seq_len, "prompts": pairs, "sequences": sequences})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in quants:
            path = export_gguf(model, tok, Path(tmp) / f"m-{quant}.gguf", quant=quant)
            size = f"{path.stat().st_size / 1e6:.1f}"
            proc = subprocess.run([python, __file__, "--worker", str(path), job], capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "PYTHONPATH": ""})
            if proc.returncode != 0:
                said = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1][:120]
                rows.append([label, quant, size, "–", f"llama.cpp exited {proc.returncode}: {said}"] + ["–"] * 4)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            same_tokens = result["sample"] == tok.encode(SAMPLE)
            got = result["continuations"]
            stored = as_stored(model, quant)  # (ours on the file's numbers, as many tokens as llama.cpp made)
            ours_stored = [generate_ids(stored, ids, max_tokens=len(g), temperature=0.0)
                           for ids, g in zip(prompts, got)]
            theirs = [np.asarray(x, dtype=np.float32) for x in result["logits"]]
            with torch.no_grad():
                rounded_logits = [stored(torch.tensor([seq]))[0][0].numpy() for seq in sequences]
            made = sum(len(g) for g in got)
            rows.append([label, quant, size, "yes" if same_tokens else "NO", matching(got, ours),
                         forced(theirs, logits, spread), matching(ours_stored, ours),
                         forced(rounded_logits, logits, spread), f"{made / result['seconds']:.0f}"])
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
    print(f"greedy: {args.tokens} tokens x {len(PROMPTS)} prompts, tokens before the first difference from ours "
          "(fp32). teacher-forced: each prompt with our greedy continuation, the logits at every position against "
          "ours: positions with the same top token; the largest |difference| over the standard deviation of ours. "
          "'ours on the file's weights': our decoder with the weights rounded as the file stores them (f16, q8_0), "
          "how far the rounding alone moves our own output\n")
    print(markdown_table(["model", "GGUF", "MB", "same tokenization", "llama.cpp: greedy", "llama.cpp: teacher-forced",
                          "ours on the file's weights: greedy", "ours on the file's weights: teacher-forced",
                          "llama.cpp tok/s"], rows))


if __name__ == "__main__":
    main()
