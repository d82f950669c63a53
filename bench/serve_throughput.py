"""Aggregate decode throughput of `commonlm serve` at 1, 4, 16 and 64 concurrent streams.

    .venv/bin/python bench/serve_throughput.py [--dtype bf16] [--quantize int8]

Starts the real server (`python -m commonlm serve`, a subprocess on 127.0.0.1) on a GPT-2-small-shaped
model with random weights, then runs N streaming clients at once, each asking for 64 tokens after a
32-token prompt (greedy; ignore_eos is implicit: random weights rarely emit end-of-text). Aggregate
tokens/s = all completion tokens / wall time from the first request to the last stream's end. The clients
run in this process, on the same cores as the server: "client CPU s" is the CPU time they took.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table  # noqa: E402

from commonlm.config import ModelConfig, RunConfig  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.modeldir import save_model_dir  # noqa: E402

NEW, PROMPT = 64, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(url: str, i: int) -> int:
    prompt = [(7 * i + 3 * j) % 250 + 1 for j in range(PROMPT)]
    body = {"model": "bench", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--quantize", choices=["int8", "int4"])
    p.add_argument("--levels", default="1,4,16,64")
    args = p.parse_args()
    print(f"{machine()}; load {load_average()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    levels = [int(x) for x in args.levels.split(",")]

    torch.manual_seed(0)
    config = ModelConfig(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                         pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(Path(tmp) / "m", Decoder(config), Tokenizer.byte_level(), RunConfig(model=config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "commonlm", "serve", str(Path(tmp) / "m"), "--port", str(port), "--name",
               "bench", "--dtype", args.dtype, "--max-batch", str(max(levels)), "--max-queue", "1000"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.5)
            stream_one(url, 0)  # warm-up
            rows, base = [], None
            for n in levels:
                t0, cpu0 = time.perf_counter(), time.process_time()
                with concurrent.futures.ThreadPoolExecutor(n) as pool:
                    tokens = sum(pool.map(lambda i: stream_one(url, i), range(n)))
                wall, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
                rate = tokens / wall
                base = base or rate
                rows.append([n, tokens, f"{wall:.2f}", f"{rate:.1f}", f"{rate / base:.2f}x", f"{client_cpu:.2f}"])
        finally:
            server.terminate()
            server.wait(timeout=30)
    label = f"{args.dtype}{' + ' + args.quantize if args.quantize else ''}"
    print(f"GPT-2 small shape (124M, random weights, {label}), prompt {PROMPT} tokens, {NEW} new tokens per stream\n")
    print(markdown_table(["concurrent streams", "tokens", "wall s", "aggregate tokens/s", "vs 1 stream",
                        "client CPU s"], rows))


if __name__ == "__main__":
    main()
