"""GSM8K accuracy before and after GRPO, for a model trained here from nothing (no download).

The whole chain in time budgets on this machine: a BPE tokenizer and pretraining on GSM8K's training problems
(question and worked answer as plain text), supervised fine-tuning on them as conversations (`tune sft`),
then GRPO (`tune grpo --reward gsm8k`) on the training questions. Accuracy is measured on the first
`--test` problems of GSM8K's test split, greedy, by the batched engine, with the gsm8k reward checker
(final number equals the answer's), after SFT (before GRPO) and after GRPO.

    python bench/gsm8k_grpo.py                      # about an hour on 2 CPU cores (the defaults)
    python bench/gsm8k_grpo.py --pretrain-s 300 --sft-s 180 --grpo-s 300 --test 100

Needs ../shared/data/gsm8k (see its README); writes under --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, machine, setup_threads  # noqa: E402

from commonlm.api import load  # noqa: E402
from commonlm.config import load_config  # noqa: E402
from commonlm.data.chat import prepare_chat  # noqa: E402
from commonlm.data.prepare import prepare  # noqa: E402
from commonlm.data.prompts import prepare_prompts  # noqa: E402
from commonlm.data.tokenizer import Tokenizer  # noqa: E402
from commonlm.infer.engine import Engine, Request  # noqa: E402
from commonlm.train.metrics import read_metrics  # noqa: E402
from commonlm.train.trainer import train  # noqa: E402
from commonlm.tune.grpo import grpo_config  # noqa: E402
from commonlm.tune.rewards import final_number, gsm8k  # noqa: E402
from commonlm.tune.sft import sft_config  # noqa: E402
from commonlm.utils import atomic_write_text  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 2/2=<<2/2=1>>1 reads 2/2=1


def problems(split: str) -> list[dict]:
    return [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def worked(answer: str) -> str:
    return CALC.sub("", answer)


def jsonl(path: Path, records: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def accuracy(model_dir: Path, items: list[dict], max_tokens: int) -> float:
    """Share of `items` whose greedy reply to the question has the answer's final number."""
    lm = load(model_dir, device="cpu")
    tok = lm.tokenizer
    engine = Engine(lm.model, max_batch=32, max_len=lm.model.config.max_seq_len)
    requests = [Request(prompt_ids=tok.encode_chat([{"role": "user", "content": it["question"]}]),
                        max_tokens=max_tokens, temperature=0.0, stop_ids=tok.stop_ids) for it in items]
    seqs = engine.run_all(requests)
    return sum(gsm8k(tok.decode(s.generated), it["answer"]) for s, it in zip(seqs, items)) / len(items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-gsm8k")
    p.add_argument("--pretrain-s", type=float, default=1800)
    p.add_argument("--sft-s", type=float, default=900)
    p.add_argument("--grpo-s", type=float, default=900)
    p.add_argument("--test", type=int, default=200, help="GSM8K test problems scored")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args()
    setup_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not GSM8K.is_dir():
        sys.exit(f"no GSM8K at {GSM8K} (see ../shared/data/README.md)")
    train_items, test_items = problems("train"), problems("test")[: args.test]
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    plain = [it["question"] + "\n" + worked(it["answer"]) for it in train_items]
    Tokenizer.train_bpe(plain, vocab_size=4096).save(out / "tokenizer")
    texts = jsonl(out / "pretrain.jsonl", [{"text": text} for text in plain])
    prepare([str(texts)], out / "tokenizer", out / "data", val_fraction=0.02, overwrite=True)
    config = load_config("quickstart", [f"train.max_time={args.pretrain_s}", f"model.n_layer={args.layers}",
                                        f"model.d_model={args.d_model}", f"model.n_head={args.d_model // 64}",
                                        f"model.max_seq_len={args.context}", "train.micro_batch_size=8"])
    config.data.path = str(out / "data")
    pre = train(config, out / "pretrain")
    timings["pretrain"] = time.perf_counter() - t0

    chats = jsonl(out / "sft.jsonl", [{"messages": [{"role": "user", "content": it["question"]},
                                                    {"role": "assistant", "content": worked(it["answer"])}]}
                                      for it in train_items])
    prepare_chat([str(chats)], pre.final_dir, out / "chat", val_fraction=0.02, overwrite=True)
    sft = train(sft_config(str(pre.final_dir), str(out / "chat"),
                           [f"train.max_time={args.sft_s}", "train.max_steps=1000000", "train.lr=5e-4",
                            "train.eval_every=500", "train.ckpt_every=0"]),
                out / "sft", init=pre.final_dir)
    timings["sft"] = time.perf_counter() - t0 - sum(timings.values())
    before = accuracy(sft.final_dir, test_items, max_tokens=256)

    prompts = jsonl(out / "prompts.jsonl", [{"prompt": it["question"], "answer": str(final_number(it["answer"]))}
                                            for it in train_items])
    prepare_prompts([str(prompts)], sft.final_dir, out / "prompts", val_fraction=0.01, overwrite=True)
    t_grpo = time.perf_counter()
    grpo = train(grpo_config(str(sft.final_dir), str(out / "prompts"),
                             ["train.reward=gsm8k", f"train.max_time={args.grpo_s}", "train.max_steps=1000000",
                              "train.lr=5e-6", "train.grpo_max_new_tokens=256", "train.eval_every=0",
                              "train.ckpt_every=0", "train.log_every=5"]),
                 out / "grpo", init=sft.final_dir)
    timings["grpo"] = time.perf_counter() - t_grpo
    after = accuracy(grpo.final_dir, test_items, max_tokens=256)
    rewards = [r["reward"] for r in read_metrics(out / "grpo") if "reward" in r]

    params = pre.model.num_params()
    print(f"\n{machine()} · load {load_average()} · {time.strftime('%Y-%m-%d')}")
    print(f"model: llama {args.layers} layers, d_model {args.d_model}, context {args.context}, "
          f"{params / 1e6:.1f}M params, trained from nothing on GSM8K's training problems\n")
    print(f"| stage | steps | seconds | GSM8K test accuracy (first {len(test_items)}, greedy) |")
    print("|---|---|---|---|")
    print(f"| pretraining (plain text) | {pre.step} | {timings['pretrain']:.0f} | |")
    print(f"| SFT (conversations) | {sft.step} | {timings['sft']:.0f} | {100 * before:.1f}% |")
    print(f"| GRPO (reward gsm8k) | {grpo.step} | {timings['grpo']:.0f} | {100 * after:.1f}% |")
    if rewards:
        print(f"\nGRPO mean training reward: first log {rewards[0]:.3f}, last log {rewards[-1]:.3f} "
              f"({len(rewards)} logs)")


if __name__ == "__main__":
    main()
