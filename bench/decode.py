"""Single-stream decode speed on this machine: ours (fp32, bf16, int8, int4) vs transformers generate().

    .venv/bin/python bench/decode.py                       # GPT-2-small shape, random weights
    .venv/bin/python bench/decode.py --quality runs/quickstart/run/final --data runs/quickstart/data

Both engines decode the same weights: our model is saved as a model directory and transformers loads that
directory. Prompt of 32 random tokens, 128 new tokens, greedy. TTFT = from the call to the first new token
(includes the prefill); decode ms/token = (time of token 128 - time of token 1) / 127. The memory-bandwidth
limit is bytes of weights read per token divided by the copy bandwidth measured in this run (read+write bytes,
as STREAM counts; measured before and after the timings, the larger kept: this host is shared). Rows marked
"compiled" decode through `stream_ids(..., compile=True)` (`generate --compile`); the warm-up run before the
timed ones pays for the compilation. With --quality, the validation perplexity of a trained model is measured
in each precision.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table, setup_threads, sync  # noqa: E402

from commonlm.config import ModelConfig, RunConfig  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.infer.generate import stream_ids  # noqa: E402
from commonlm.infer.packed import can_pack, pack_linears  # noqa: E402
from commonlm.infer.quant import quantize_model, weight_bytes  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.modeldir import save_model_dir  # noqa: E402
from commonlm.runtime import pick_device  # noqa: E402

PROMPT, NEW = 32, 128


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def gpt2_small(device: torch.device) -> Decoder:
    """The GPT-2-small shape (124M) with seeded random weights, fp32."""
    torch.manual_seed(0)
    config = ModelConfig(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                         pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True)
    return Decoder(config).eval().to(device)


def bench_prompt() -> list[int]:
    return torch.randint(3, 50000, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()


def time_ours(model: Decoder, prompt: list[int], compile: bool = False) -> tuple[float, float]:
    stamps = []
    t0 = time.perf_counter()
    for _ in stream_ids(model, prompt, max_tokens=NEW, temperature=0.0, compile=compile):
        stamps.append(time.perf_counter())
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def time_hf(model, prompt: list[int]) -> tuple[float, float]:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first put is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    streamer = Stamps()
    ids = torch.tensor([prompt], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                       min_new_tokens=NEW, pad_token_id=0, streamer=streamer)
    return streamer.times[0] - t0, (streamer.times[-1] - streamer.times[0]) / (len(streamer.times) - 1)


def median_runs(fn, runs: int) -> tuple[float, float]:
    fn()  # warm-up
    results = [fn() for _ in range(runs)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def perplexities(model_dir: str, data_dir: str, max_tokens: int) -> list[list[str]]:
    from commonlm.api import load
    from commonlm.data.loader import TokenData
    from commonlm.evaluate.evaluate import evaluate

    base = load(model_dir, device="cpu")
    data = TokenData(data_dir)
    rows = []
    reference = None
    for name in ("fp32", "bf16", "int8", "int4"):
        model = copy.deepcopy(base.model)
        dtype = torch.bfloat16 if name != "fp32" else torch.float32
        model.to(dtype)
        if name in ("int8", "int4"):
            quantize_model(model, name, dtype=dtype)
        result = evaluate(model, data, model.config.max_seq_len, 8, max_tokens)
        reference = reference or result.perplexity
        rows.append([name, f"{result.loss:.4f}", f"{result.perplexity:.3f}",
                     f"{100 * (result.perplexity / reference - 1):+.2f}%"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="leave out the compiled decode step (--compile)")
    p.add_argument("--quality", metavar="MODEL_DIR", help="a trained model for the perplexity comparison")
    p.add_argument("--data", metavar="DATA_DIR", help="its prepared data (validation split)")
    p.add_argument("--quality-tokens", type=int, default=65536)
    args = p.parse_args()
    setup_threads(args.threads)
    device = pick_device(args.device)
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"{machine()}{gpu}; load {load_average()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")

    model = gpt2_small(device)
    config = model.config
    prompt = bench_prompt()
    bandwidth_before = copy_bandwidth(device)

    variants = {"fp32": model}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    variants["bf16"] = bf16
    if device.type == "cpu" and can_pack(bf16):  # what `generate`, `chat` and `serve` run in bf16 on CPU
        variants["bf16 packed"] = pack_linears(copy.deepcopy(bf16))
    variants["int8 (bf16 act.)"] = quantize_model(copy.deepcopy(bf16), "int8", dtype=torch.bfloat16)
    variants["int4 g32 (bf16 act.)"] = quantize_model(copy.deepcopy(bf16), "int4", dtype=torch.bfloat16)

    timed = []  # (engine, weight bytes, ttft, seconds per token, HF baseline name)
    runs = [(name, m, False) for name, m in variants.items()]
    if not args.skip_compile:
        runs += [(f"{name}, compiled", m, True) for name, m in variants.items() if "packed" not in name]
    for name, m, compile in runs:
        ttft, step = median_runs(lambda m=m, compile=compile: time_ours(m, prompt, compile), args.runs)
        plain = name.split(",")[0].replace(" packed", "")
        timed.append((f"ours {name}", weight_bytes(variants[plain]), ttft, step, plain))  # (packed weights are opaque)
    hf_step = {}
    if not args.skip_hf:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_model_dir(Path(tmp) / "m", copy.deepcopy(model).cpu(), Tokenizer.byte_level(), RunConfig(model=config))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=dtype).eval().to(device)
                ttft, step = median_runs(lambda hf=hf: time_hf(hf, prompt), args.runs)
                hf_step[name] = step
                timed.append((f"transformers generate() {name}", weight_bytes(variants[name]), ttft, step, name))
    # the host is shared: the larger of two measurements is the closer to what the memory can do
    bandwidth_after = copy_bandwidth(device)
    bandwidth = max(bandwidth_before, bandwidth_after)
    rows = []
    for engine, nbytes, ttft, step, plain in timed:
        limit = bandwidth / nbytes
        ratio = f"{hf_step[plain] / step:.2f}x" if plain in hf_step else ""
        rows.append([engine, f"{nbytes / 1e6:.0f}", f"{1000 * ttft:.1f}", f"{1000 * step:.2f}", f"{1 / step:.1f}",
                     f"{limit:.0f}", f"{100 * (1 / step) / limit:.0f}%", ratio])
    print(f"GPT-2 small shape (124M params, random weights), prompt {PROMPT}, {NEW} new tokens, greedy, batch 1; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (the larger of {bandwidth_before / 1e9:.1f} before the "
          f"timings and {bandwidth_after / 1e9:.1f} after); median of {args.runs} runs\n")
    print(markdown_table(["engine", "weight MB/token", "TTFT ms", "decode ms/token", "tokens/s",
                          "bandwidth limit tok/s", "% of limit", "vs transformers"], rows))
    if args.quality and args.data:
        print(f"\nquality: {args.quality} on {args.data} (validation, first {args.quality_tokens} tokens)\n")
        print(markdown_table(["weights", "val loss", "perplexity", "vs fp32"],
                             perplexities(args.quality, args.data, args.quality_tokens)))


if __name__ == "__main__":
    main()
