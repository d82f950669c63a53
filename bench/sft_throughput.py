"""Fine-tuning throughput: (a) SFT against pretraining through the real loop on the same model, (b) one
conversation per row with padding (what tune/sft.py does) against conversations packed into full windows.

    .venv/bin/python bench/sft_throughput.py                    # 4 layers x 256 wide (llama), context 1024
    .venv/bin/python bench/sft_throughput.py --part b --conversations 48 --dtypes bf16

The conversations are the chat quickstart's (data/instructions.py: questions about this Python's standard
library answered from its docstrings and signatures, built offline, seeded), rendered with the byte tokenizer's
ChatML template: one token per byte, lengths from ~140 to ~1450 tokens, median ~520 (a long tail, like real
chat data). The model is a small llama of our Decoder (random weights: bench/dpo_vs_trl.py's small_llama).

(a) Both runs start from that model with `commonlm train`'s loop (train.threads = this run's thread count, the
dtype given): pretraining on the same conversations' text prepared as plain documents (windows of the full
context, every position a target), SFT (tune/sft.py's defaults but the batch size) on the chat data, for the
same budget of real (non-pad) tokens. Seconds per step come from the loop's log (positions / tok_per_s, the
first step left out). Columns: positions/s (what the model computed, pads included: the loop's tok/s), real
tokens/s (pads left out), and loss tokens/s (SFT: the assistants' tokens only).

(b) Forward + loss + backward only (no optimizer), over the same conversations in the same seeded order, timed
whole, in alternating rounds: padded rows of `--batch` conversations, each row as long as the longest of its
batch, against windows of the full context filled greedily in that order (a conversation that does not fit
starts the next window), `--pack-rows` windows per micro-batch, with positions restarting at each conversation
and a block-diagonal causal boolean mask given to F.scaled_dot_product_attention -- what packed training on
this CPU would compute. The packed forward runs the real Decoder through its cache seam (a stand-in cache
that hands every layer the mask and positions); its logits are first checked against each conversation run
alone. Figure: real tokens per second.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import human, load_average, machine, markdown_table, median, setup_threads  # noqa: E402
from dpo_vs_trl import small_llama  # noqa: E402

from commonlm.config import apply_overrides, config_from_dict  # noqa: E402
from commonlm.data.chat import ChatData, prepare_chat  # noqa: E402
from commonlm.data.instructions import build_instructions  # noqa: E402
from commonlm.data.prepare import prepare  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.model.loss import IGNORE, lm_loss  # noqa: E402
from commonlm.modeldir import read_run_config  # noqa: E402
from commonlm.runtime import autocast  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402
from commonlm.tune.sft import rows  # noqa: E402
from commonlm.utils import write_jsonl  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- (a) SFT against pretraining through the loop --------------------------------------------------------
def step_seconds(run: Path) -> tuple[list[float], list[int]]:
    """Seconds and positions of each logged step after the first, from the loop's log (log_every=1)."""
    records = [r for r in read_metrics(run) if "tok_per_s" in r]
    tokens = [0] + [r["tokens"] for r in records]
    positions = [tokens[i + 1] - tokens[i] for i in range(len(records))]
    return [p / r["tok_per_s"] for p, r in zip(positions, records)][1:], positions[1:]


def loop_runs(model_dir: Path, text: Path, chat: Path, args, dtype: str) -> list[list[object]]:
    from commonlm.train.trainer import train
    from commonlm.tune.sft import ChatSFT, sft_config
    from commonlm.world import World

    common = [f"train.threads={torch.get_num_threads()}", f"train.dtype={dtype}", "train.log_every=1",
              "train.eval_every=0", "train.ckpt_every=0", f"train.micro_batch_size={args.batch}", "train.seq_len=0",
              "train.tokens_per_step=0", "train.max_time=0", "train.warmup_steps=0", "train.lr=1e-4"]
    base, _ = read_run_config(model_dir)
    pre = config_from_dict(apply_overrides(base.to_dict(), common + [f"train.max_steps={args.pretrain_steps}"]))
    pre.data.path = str(text)
    budget = args.pretrain_steps * args.batch * args.context  # real tokens: every position of a window

    # SFT: as many steps as it takes to see the same number of real tokens (its order is seeded: walk it)
    probe = ChatSFT(sft_config(str(model_dir), str(chat), common), World(), torch.device("cpu"), torch.float32)
    seen, sft_steps, real, targets = 0, 0, [], []
    while seen < budget:
        convs = [probe.data.conversation("train", i) for i in probe._pick()]
        real.append(sum(min(len(ids), args.context + 1) - 1 for ids, _ in convs))
        targets.append(sum(int(np.asarray(m[1 : args.context + 1]).sum()) for _, m in convs))
        seen, sft_steps = seen + real[-1], sft_steps + 1
    sft = sft_config(str(model_dir), str(chat), common + [f"train.max_steps={sft_steps}"])

    out = []
    for name, config in (("pretraining (full windows)", pre), ("SFT (padded rows)", sft)):
        run = args.root / f"run-{dtype}-{name.split()[0]}"
        shutil.rmtree(run, ignore_errors=True)
        train(config, run, init=model_dir)
        seconds, positions = step_seconds(run)
        if name.startswith("SFT"):
            real_s, target_s = sum(real[1:]) / sum(seconds), sum(targets[1:]) / sum(seconds)
        else:
            real_s = target_s = sum(positions) / sum(seconds)
        out.append([name, dtype, len(seconds), f"{median(seconds):.2f}", human(sum(positions) / sum(seconds)),
                    human(real_s), human(target_s)])
    return out


# -- (b) padding against packing ---------------------------------------------------------------------------
class PackedWindows:
    """Stands in for a KV cache in Decoder.forward: positions restart at every conversation of a window, and
    every layer's attention gets the block-diagonal causal mask (a query sees earlier keys of its own
    conversation only); nothing is stored."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor):
        T = positions.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal  # [B, 1, T, T]
        self._positions = positions

    def positions(self, T: int) -> torch.Tensor:
        return self._positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k, v, self.mask

    def advance(self, n: int) -> None:
        pass


def pack(conversations: list[tuple[np.ndarray, np.ndarray]], context: int, per_batch: int, pad: int):
    """Micro-batches (x, y, positions, segments) [R, context] of windows filled greedily in order; padding at a
    window's end has its own segment (-1 - position, so it sees only itself) and IGNORE targets."""
    windows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for ids, mask in conversations:
        n = min(len(ids), context + 1) - 1
        if used + n > context:
            windows.append([])
            used = 0
        windows[-1].append((ids[: n + 1], mask[: n + 1]))
        used += n
    batches = []
    for start in range(0, len(windows), per_batch):
        group = windows[start : start + per_batch]
        x = torch.full((len(group), context), pad, dtype=torch.long)
        y = torch.full_like(x, IGNORE)
        positions = torch.arange(context).repeat(len(group), 1)
        segments = -1 - positions.clone()
        for r, window in enumerate(group):
            at = 0
            for s, (ids, mask) in enumerate(window):
                n, t = len(ids) - 1, torch.from_numpy(ids.astype(np.int64))
                x[r, at : at + n] = t[:-1]
                y[r, at : at + n] = t[1:].masked_fill(~torch.from_numpy(mask[1:].astype(bool)), IGNORE)
                positions[r, at : at + n] = torch.arange(n)
                segments[r, at : at + n] = s
                at += n
        batches.append((x, y, positions, segments))
    return batches


def check_packed(model: Decoder, batch, conversations, context: int) -> None:
    """The first window's logits equal each of its conversations run alone (fp32)."""
    x, _, positions, segments = batch
    with torch.no_grad():
        packed, _ = model(x[:1], cache=PackedWindows(positions[:1], segments[:1]))
        at = 0
        for ids, _ in conversations:
            n = min(len(ids), context + 1) - 1
            if at + n > context or segments[0, at] < 0:
                break
            alone, _ = model(torch.from_numpy(ids[:n].astype(np.int64))[None])
            err = (packed[0, at : at + n] - alone[0]).abs().max().item()
            assert err < 1e-3, f"packed logits differ from the conversation alone by {err}"
            at += n


def fwd_bwd(model: Decoder, batches, packed: bool, dtype: torch.dtype) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        with autocast(torch.device("cpu"), dtype):
            if packed:
                x, y, positions, segments = batch
                logits, _ = model(x, cache=PackedWindows(positions, segments))
            else:
                x, y = batch
                logits, _ = model(x)
        lm_loss(logits, y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def padding_vs_packing(model: Decoder, data: ChatData, pad: int, args) -> list[list[object]]:
    order = random.Random(0).sample(range(data.conversations("train")), args.conversations)
    convs = [data.conversation("train", i) for i in order]
    real = sum(min(len(ids), args.context + 1) - 1 for ids, _ in convs)
    padded = [rows(convs[i : i + args.batch], args.context, pad, torch.device("cpu"))
              for i in range(0, len(convs), args.batch)]
    packed = pack(convs, args.context, args.pack_rows, pad)
    check_packed(model, packed[0], convs, args.context)
    out = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        times: dict[str, list[float]] = {"padded": [], "packed": []}
        fwd_bwd(model, padded[:1], False, dtype), fwd_bwd(model, packed[:1], True, dtype)  # warm-up
        for _ in range(args.rounds):
            times["padded"].append(fwd_bwd(model, padded, False, dtype))
            times["packed"].append(fwd_bwd(model, packed, True, dtype))
        base = real / median(times["padded"])
        for kind, batches in (("padded rows", padded), ("packed windows", packed)):
            positions, seconds = sum(b[0].numel() for b in batches), median(times[kind.split()[0]])
            shape = f"{batches[0][0].shape[0]} x <= {max(b[0].shape[1] for b in batches)}"
            out.append([kind, name, len(batches), shape, f"{100 * (1 - real / positions):.0f}%", f"{seconds:.2f}",
                        human(real / seconds), f"{real / seconds / base:.2f}x"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="conversations per padded micro-batch (SFT's default)")
    p.add_argument("--pack-rows", type=int, default=4, help="windows of the full context per packed micro-batch")
    p.add_argument("--conversations", type=int, default=32, help="(b): conversations timed")
    p.add_argument("--rounds", type=int, default=2, help="(b): alternating timing rounds")
    p.add_argument("--pretrain-steps", type=int, default=4, help="(a): pretraining steps; SFT gets the same tokens")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16 (autocast, our CPU default), fp32")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    setup_threads(args.threads)

    args.root = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    try:
        model, tok = small_llama(args.root / "model", args.layers, args.width, args.context), Tokenizer.byte_level()
        records = build_instructions(seed=0, limit=1000)
        write_jsonl(args.root / "chat.jsonl", records)
        prepare_chat([str(args.root / "chat.jsonl")], args.root / "model", args.root / "chat", val_fraction=0)
        data = ChatData(args.root / "chat")
        lengths = [len(data.conversation("train", i)[0]) for i in range(data.conversations("train"))]
        print(f"# sft_throughput · {machine()} · load {load_average()}")
        print(f"{model.num_params() / 1e6:.1f}M-parameter llama ({args.layers} x {args.width}), context "
              f"{args.context}, byte tokens; {len(lengths)} conversations of {min(lengths)}-{max(lengths)} tokens "
              f"(median {median(lengths):.0f}, {100 * np.mean(np.array(lengths) > args.context + 1):.1f}% cut to "
              "the context)")
        if args.part in ("a", "both"):
            docs = args.root / "text"
            docs.mkdir()
            for i, r in enumerate(records):
                (docs / f"{i:05d}.txt").write_text("\n\n".join(m["content"] for m in r["messages"]) + "\n")
            tok.save(args.root / "tok")
            prepare([str(docs)], args.root / "tok", args.root / "textdata", val_fraction=0, workers=1, progress=False)
            table = [row for name in args.dtypes.split(",") for row in
                     loop_runs(args.root / "model", args.root / "textdata", args.root / "chat", args, name)]
            print(f"\n(a) through the loop, {args.batch} rows per micro-batch, the same real-token budget "
                  f"({human(args.pretrain_steps * args.batch * args.context)} tokens); load {load_average()}")
            print(markdown_table(["run", "dtype", "steps timed", "s/step", "positions/s", "real tokens/s",
                                  "loss tokens/s"], table))
        if args.part in ("b", "both"):
            table = padding_vs_packing(model, data, tok.pad_id, args)
            print(f"\n(b) forward + backward over {args.conversations} conversations, median of {args.rounds} "
                  f"rounds; load {load_average()}")
            print(markdown_table(["layout", "dtype", "micro-batches", "rows x positions", "pad share", "seconds",
                                  "real tokens/s", "vs padded"], table))
    finally:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
