"""One DPO step through our loop (tune dpo's objective), against TRL's DPOTrainer on the same model and pairs.

    .venv/bin/python bench/dpo_vs_trl.py                     # 4 layers x 256 wide (llama), 4 pairs per step
    .venv/bin/python bench/dpo_vs_trl.py --steps 8 --rounds 3 --pairs 8

The model is a small llama of our Decoder (random weights, byte tokenizer with a ChatML template), written once
by modeldir's writer: the same directory is `--init` (and the reference) of our DPO run and `from_pretrained`
for transformers. The pairs are synthetic (seeded random words; prompts of 20-80 characters, replies of 40-200,
so rows of one batch differ in length as real ones do); TRL gets them as conversations and renders them with the
same chat template: the ids are checked equal to ours before timing. Both sides: sigmoid loss, beta 0.1, the
same pairs per step (each side in its own seeded order), one forward over chosen and rejected rows padded to the
longest, the reference's log-probabilities computed once before training (ours always; TRL with
precompute_ref_log_probs=True) so a step is the policy's forward and backward only, AdamW at the same constant
learning rate with clipping at 1, fp32 on the CPU (ours train.dtype=fp32; TRL use_cpu=True, bf16=False), the
same torch thread count. What differs: TRL's fused LM head computes log-probabilities in tiles without the full
logits (its default), ours from full logits; TRL logs more per step (entropy, mean logits, token accuracy).

Seconds per step: ours from the loop's own log (log_every=1: positions per step / tok_per_s, the time between
two log lines: batch, forward, backward, optimizer, bookkeeping); TRL's between two `on_step_end` callbacks. The
first step of each run is left out (warm-up); the figure is the median over all rounds, the two sides timed in
alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, markdown_table, median, setup_threads  # noqa: E402

from commonlm.config import ModelConfig, RunConfig  # noqa: E402
from commonlm.data.chat import ChatData, prepare_chat  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.modeldir import save_model_dir  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402

WORDS = ("the model reads text and learns to predict next token data loss step function value list file "
         "returns string number error path line name object call result first last").split()


def small_llama(path: Path, layers: int, width: int, context: int) -> Decoder:
    """A llama of our Decoder (seeded random weights, 4 heads, untied head) with the byte tokenizer and its ChatML
    template, written to `path` by modeldir's writer (which transformers' from_pretrained reads)."""
    torch.manual_seed(0)
    config = RunConfig(model=ModelConfig(family="llama", n_layer=layers, n_head=4, d_model=width, vocab_size=320,
                                         max_seq_len=context, tie_embeddings=False))
    model = Decoder(config.model)
    save_model_dir(path, model, Tokenizer.byte_level(), config)
    return model


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        want, words = rng.randint(lo, hi), []
        while sum(len(w) + 1 for w in words) < want:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    return [{"prompt": text(20, 80), "chosen": text(40, 200), "rejected": text(40, 200)} for _ in range(n)]


def ours(model_dir: Path, data: Path, out: Path, args, dtype: str = "fp32") -> tuple[list[float], float]:
    """Seconds of each step after the first, from the loop's log, and the first step's loss."""
    from commonlm.train.trainer import train
    from commonlm.tune.dpo import dpo_config

    shutil.rmtree(out, ignore_errors=True)
    config = dpo_config(str(model_dir), str(data), [
        f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
        f"train.micro_batch_size={args.pairs}", "train.dpo_beta=0.1", f"train.dtype={dtype}",
        f"train.threads={torch.get_num_threads()}", "train.lr=5e-6", "train.warmup_steps=0",
        "train.schedule=constant", "train.grad_clip=1.0"])
    train(config, out, init=model_dir)
    records = [r for r in read_metrics(out) if "tok_per_s" in r]
    tokens = [0] + [r["tokens"] for r in records]
    return [(tokens[i + 1] - tokens[i]) / r["tok_per_s"] for i, r in enumerate(records)][1:], records[0]["loss"]


def trl_dataset(pairs: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])


def trl(model_dir: Path, pairs: list[dict], out: Path, args,
        check: ChatData | None = None) -> tuple[list[float], float]:
    """Seconds of each step after the first, between TRL's on_step_end callbacks, and the first step's loss.
    With `check`, first assert that TRL's token ids of every pair equal our prepared data's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    shutil.rmtree(out, ignore_errors=True)
    config = DPOConfig(output_dir=str(out), use_cpu=True, bf16=False, per_device_train_batch_size=args.pairs,
                       beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True, learning_rate=5e-6,
                       lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_steps=args.steps,
                       logging_steps=1, report_to="none", save_strategy="no", gradient_accumulation_steps=1,
                       seed=0, dataloader_num_workers=0, max_length=None)
    times = StepTimes()
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config,
                         train_dataset=trl_dataset(pairs), processing_class=AutoTokenizer.from_pretrained(model_dir),
                         callbacks=[times])
    if check is not None:
        same_ids(trainer.train_dataset, check)
    trainer.train()
    return [b - a for a, b in zip(times.ends, times.ends[1:])], times.losses[0]


def same_ids(dataset, data: ChatData) -> None:
    """TRL's tokenized pairs (prompt_ids + chosen_ids / rejected_ids) are our prepared conversations, token for
    token (ours keep the train split's order of the jsonl when there is no validation split)."""
    ours = {tuple(data.conversation("train", i)[0].tolist()) for i in range(data.conversations("train"))}
    theirs = {tuple(row["prompt_ids"] + row[reply]) for row in dataset for reply in ("chosen_ids", "rejected_ids")}
    assert ours == theirs, f"token ids differ: {len(ours ^ theirs)} of {len(ours | theirs)} sequences"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (twice as many rows)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--bf16-too", action=argparse.BooleanOptionalAction, default=True,
                   help="also time ours under bf16 autocast (what train.dtype=auto picks on a CPU with bf16)")
    args = p.parse_args()
    setup_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    try:
        model = small_llama(root / "model", args.layers, args.width, context=512)
        pairs = synthetic_pairs(args.steps * args.pairs, seed=0)
        (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        prepare_chat([str(root / "pairs.jsonl")], root / "model", root / "data", val_fraction=0, preference=True)
        data = ChatData(root / "data")
        lengths = [len(data.conversation("train", i)[0]) for i in range(data.conversations("train"))]
        times: dict[str, list[float]] = {"commonlm (tune dpo), fp32": [], "TRL DPOTrainer, fp32": []}
        if args.bf16_too:
            times["commonlm (tune dpo), bf16 autocast (its CPU default)"] = []
        first: dict[str, float] = {}
        for r in range(args.rounds):
            for name in times:
                if name.startswith("commonlm"):
                    dtype = "bf16" if "bf16" in name else "fp32"
                    t, first[name] = ours(root / "model", root / "data", root / "ours", args, dtype)
                else:
                    t, first[name] = trl(root / "model", pairs, root / "trl", args, data if r == 0 else None)
                times[name] += t
        base = median(times["TRL DPOTrainer, fp32"])
        rows = [[name, f"{median(t):.3f}", f"{base / median(t):.2f}x", len(t), f"{first[name]:.4f}"]
                for name, t in times.items()]
        print(f"\nDPO step (sigmoid, reference log-probs precomputed), {model.num_params() / 1e6:.1f}M-parameter "
              f"llama ({args.layers} x {args.width}), {args.pairs} pairs = {2 * args.pairs} rows per step, "
              f"sequences of {min(lengths)}-{max(lengths)} tokens (median {median(lengths):.0f}); "
              f"{machine()}; load {load_average()}")
        print(markdown_table(["", "s/step (median)", "speed vs TRL", "steps timed", "first loss"], rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
