"""One GRPO step (rollouts + update) through our loop, against TRL's GRPOTrainer on the same model and work.

    .venv/bin/python bench/grpo_vs_trl.py                       # 4 layers x 256 wide (llama), 2 prompts x 8
    .venv/bin/python bench/grpo_vs_trl.py --steps 6 --completion 32 128 --rounds 3

The model is a small llama of our Decoder (random weights, byte tokenizer with a ChatML template), written once
by modeldir's writer: the same directory is `--init` for `commonlm tune grpo` and `from_pretrained` for
transformers. Both runs get the same prompts (2-digit sums from data/arithmetic.py, rendered by each side's chat
template: the same ids), group size, completion length, temperature 1, TRL's "dapo" loss normalisation, no KL
(beta 0), AdamW at the same learning rate with clipping at 1, fp32 on the CPU (TRL: use_cpu=True, bf16=False),
no activation checkpointing (TRL's GRPOConfig turns it on by default: gradient_checkpointing=False here),
and the same reward function (the share of digits in a completion: it varies, so the update is not zero).

Seconds per step: ours from the loop's own log (log_every=1: positions per step / tok_per_s, i.e. the time
between two log lines: rollouts, rewards, forward, backward, optimizer, bookkeeping); TRL's between two
`on_step_end` callbacks (its step: generation inside `_prepare_inputs`, rewards, loss, backward, optimizer).
The first step of each run is left out (warm-up); the figure is the median of the others over all rounds, the
two timed in alternating rounds. The random model ends a completion now and then (4 of its 320 tokens end a
turn), which is where the rollouts differ most: the engine drops a finished completion from the batch at once,
while a padded `generate` batch runs until its longest completion is done.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import load_average, machine, markdown_table, median, setup_threads  # noqa: E402

from commonlm.config import ModelConfig, RunConfig  # noqa: E402
from commonlm.data.arithmetic import problems, prompt_records  # noqa: E402
from commonlm.data.prompts import prepare_prompts  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.model.decoder import Decoder  # noqa: E402
from commonlm.modeldir import save_model_dir  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402
from commonlm.utils import write_jsonl  # noqa: E402

# the reward of both runs: the share of digits in a completion (a user's reward file, loaded as `--reward` does)
REWARD = """
def digits(completion, answer, prompt):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)
"""


def ours(model_dir: Path, prompts: Path, reward: Path, out: Path, args) -> list[float]:
    """Seconds of each step after the first, from the loop's log."""
    from commonlm.train.trainer import train
    from commonlm.tune.grpo import grpo_config

    shutil.rmtree(out, ignore_errors=True)
    config = grpo_config(str(model_dir), str(prompts), [
        f"train.reward={reward}:digits", f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=0",
        f"train.micro_batch_size={args.prompts}", f"train.grpo_group_size={args.group}",
        f"train.grpo_max_new_tokens={args.completion}", "train.grpo_temperature=1.0", "train.dtype=fp32",
        f"train.threads={torch.get_num_threads()}", "train.lr=1e-6", "train.warmup_steps=0",
        "train.schedule=constant", "train.ckpt_every=0"])
    train(config, out, init=model_dir)
    records = [r for r in read_metrics(out) if "tok_per_s" in r]
    tokens = [0] + [r["tokens"] for r in records]
    return [(tokens[i + 1] - tokens[i]) / r["tok_per_s"] for i, r in enumerate(records)][1:]


def trl(model_dir: Path, records: list[dict], reward_file: Path, out: Path, args) -> list[float]:
    """Seconds of each step after the first, between TRL's on_step_end callbacks."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from commonlm.tune.rewards import load_reward

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    digits = load_reward(f"{reward_file}:digits")

    def reward(prompts, completions, answer, **kwargs):  # conversational: lists of messages
        return [digits(c[0]["content"], a, p[-1]["content"]) for p, c, a in zip(prompts, completions, answer)]

    shutil.rmtree(out, ignore_errors=True)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in records])
    config = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, seed=0,
                        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
                        num_generations=args.group, max_completion_length=args.completion, temperature=1.0,
                        loss_type="dapo", beta=0.0, learning_rate=1e-6, max_grad_norm=1.0,
                        lr_scheduler_type="constant", max_steps=args.steps, logging_steps=1, report_to="none",
                        save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0,
                        gradient_checkpointing=False)  # (TRL's default recomputes activations; our run does not)
    times = StepTimes()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward, args=config,
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          callbacks=[times])
    trainer.train()
    return [b - a for a, b in zip(times.ends, times.ends[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="steps per run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--completion", type=int, nargs="+", default=[32, 64, 128],
                   help="max completion tokens (a row each)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    setup_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    try:
        torch.manual_seed(0)
        config = RunConfig(model=ModelConfig(family="llama", n_layer=args.layers, n_head=4, d_model=args.width,
                                             vocab_size=320, max_seq_len=256, tie_embeddings=False))
        model = Decoder(config.model)
        save_model_dir(root / "model", model, Tokenizer.byte_level(), config)
        records = prompt_records(problems(args.steps * args.prompts, seed=0, digits=2))
        write_jsonl(root / "prompts.jsonl", records)
        prepare_prompts([str(root / "prompts.jsonl")], root / "model", root / "prompts", val_fraction=0)
        (root / "reward.py").write_text(REWARD)
        rows = []
        for length in args.completion:
            run = argparse.Namespace(**{**vars(args), "completion": length})
            times: dict[str, list[float]] = {"commonlm": [], "TRL": []}
            for _ in range(args.rounds):
                times["commonlm"] += ours(root / "model", root / "prompts", root / "reward.py", root / "ours", run)
                times["TRL"] += trl(root / "model", records, root / "reward.py", root / "trl", run)
            mine, theirs = median(times["commonlm"]), median(times["TRL"])
            rows.append([length, f"{theirs:.3f}", f"{mine:.3f}", f"{theirs / mine:.2f}x", len(times["TRL"])])
        print(f"\nGRPO step, {model.num_params() / 1e6:.1f}M-parameter llama ({args.layers} x {args.width}), "
              f"{args.prompts} prompts x {args.group} completions, fp32; {machine()}; load {load_average()}")
        print(markdown_table(["max completion tokens", "TRL s/step", "commonlm s/step", "speed-up",
                              "steps timed (each)"], rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
