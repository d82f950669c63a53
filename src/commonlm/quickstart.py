"""`commonlm quickstart` (what `make demo` runs): the whole spine on this machine, no download.

Corpus: this Python's own standard library. Steps: train a BPE tokenizer, prepare token shards,
train the `quickstart` preset (Llama-style) for a fixed time budget, then report validation loss and
bits per byte before and after, and print a few samples. Everything lands under `runs/quickstart/`.

With `chat=True` (`commonlm quickstart --chat`, `make chat-demo`) it goes on to a chat model, still with no
download: conversations about the standard library built from its docstrings (data/instructions.py),
rendered with the tokenizer's chat template, supervised fine-tuning of the pretrained model in the same
loop (tune/sft.py) for a second time budget, then a few chat exchanges. It counts how many replies to
held-out questions end with the end-of-turn token, before and after fine-tuning: the format is what a model
this small can learn in minutes (facts it mostly gets wrong), and the count says whether it did. Everything
lands under `runs/quickstart-chat/`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from commonlm.config import load_config
from commonlm.errors import UserError
from commonlm.utils import console

if TYPE_CHECKING:
    from commonlm.api import LanguageModel

PROMPTS = ["def", "class", "import"]
SAMPLING = {"max_tokens": 120, "temperature": 0.7, "top_k": 40}  # sample i is drawn with seed=i
# the chat samples: conversations of user turns, each answered by the model (seed=0) before the next
CHAT_SAMPLES = [["What does `os.path.join` do?"], ["What is the `json` module for?"],
                ["What does `math.sqrt` do?", "What arguments does it take?"]]
CHAT_SAMPLING = {"max_tokens": 200, "temperature": 0.7, "top_k": 40}
FORMAT_QUESTIONS = 24  # held-out (validation) conversations whose first reply's ending is counted
SFT_SETTINGS = ["train.lr=5e-4", "train.warmup_steps=20", "train.eval_every=200", "train.ckpt_every=0",
                "train.log_every=20"]


def quickstart(out: str | Path | None = None, train_seconds: float = 240.0, overwrite: bool = False,
               vocab_size: int = 4096, max_steps: int | None = None, chat: bool = False,
               sft_seconds: float = 180.0, sft_steps: int | None = None, conversations: int = 4000) -> dict:
    """Run the four steps (seven with `chat`); `max_steps` and `sft_steps` (instead of the time budgets) make
    a run reproducible."""
    from commonlm.api import load
    from commonlm.data.prepare import prepare
    from commonlm.data.sources import iter_texts
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.train.metrics import read_metrics
    from commonlm.train.trainer import train

    out = Path(out or ("runs/quickstart-chat" if chat else "runs/quickstart"))
    steps = 7 if chat else 4
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists from an earlier quickstart; pass --overwrite to replace it")
        shutil.rmtree(out)
    t0 = time.perf_counter()

    console.rule(f"[bold]1/{steps} tokenizer[/]: byte-level BPE on the Python standard library")
    tok = Tokenizer.train_bpe(iter_texts(["stdlib"]), vocab_size=vocab_size)
    tok.save(out / "tokenizer")
    console.print(f"{tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s → {out / 'tokenizer'}")

    console.rule(f"[bold]2/{steps} data[/]: tokenize into shards (2% of files held out for validation)")
    prepare(["stdlib"], out / "tokenizer", out / "data", val_fraction=0.02)

    budget = [f"train.max_steps={max_steps}"] if max_steps else [f"train.max_time={train_seconds}"]
    console.rule(f"[bold]3/{steps} train[/]: quickstart preset for {budget[0].split('.')[1]}")
    config = load_config("quickstart", budget + ["train.eval_every=200"])
    config.data.path = str(out / "data")
    result = train(config, out / "run")
    if result.stopped_because == "signal":  # Ctrl-C: a checkpoint was saved, there is no final model to report on
        return {"steps": result.step, "final_dir": None, "exit_status": result.exit_status}
    evals = [r for r in read_metrics(out / "run") if "val_loss" in r]
    before, after = evals[0], evals[-1]

    console.rule(f"[bold]4/{steps} results[/]")
    console.print(f"validation loss   {before['val_loss']:.3f} → {after['val_loss']:.3f} nats/token")
    console.print(f"bits per byte     {before['val_bpb']:.3f} → {after['val_bpb']:.3f}")
    console.print(f"steps {result.step}, loss curve {out / 'run' / 'loss.png'}, model {result.final_dir}")
    model = load(result.final_dir)
    for i, prompt in enumerate(PROMPTS):
        console.rule(f"sample {i + 1}", style="dim")
        print(prompt + model.generate(prompt, seed=i, **SAMPLING), flush=True)
    report = {"before": before, "after": after, "steps": result.step, "final_dir": result.final_dir,
              "exit_status": 0}
    if chat:
        report["chat"] = chat_phase(out, model, sft_seconds, sft_steps, conversations)
        if report["chat"]["final_dir"] is None:
            return {**report, "exit_status": report["chat"]["exit_status"]}
        console.rule()
        console.print(f"done in {time.perf_counter() - t0:.0f}s. Try: commonlm chat {out / 'chat-run'}  or  "
                      f"commonlm serve {out / 'chat-run'}  (a web chat page at http://127.0.0.1:8000)",
                      soft_wrap=True)  # (commands to paste: never broken inside a path)
        return report
    console.rule()
    console.print(f"done in {time.perf_counter() - t0:.0f}s. Try: commonlm generate {out / 'run'} --prompt 'def '",
                  soft_wrap=True)
    return report


def chat_phase(out: Path, base: LanguageModel, sft_seconds: float, sft_steps: int | None, conversations: int) -> dict:
    """Steps 5-7: instructions from the standard library, fine-tuning `base` on them, chat samples."""
    from commonlm.api import load
    from commonlm.data.chat import prepare_chat
    from commonlm.data.instructions import build_instructions
    from commonlm.train.trainer import train
    from commonlm.tune.sft import sft_config
    from commonlm.utils import write_jsonl

    console.rule("[bold]5/7 instructions[/]: conversations about the standard library, from its docstrings")
    context = base.model.config.max_seq_len
    sample = build_instructions(seed=0, limit=200, max_chars=1_000_000)
    chars = sum(len(m["content"]) for r in sample for m in r["messages"])
    tokens = sum(len(base.tokenizer.encode_chat(r["messages"], add_generation_prompt=False)) for r in sample)
    max_chars = int(0.9 * context * chars / tokens)  # what fits the context, at this tokenizer's characters/token
    records = build_instructions(seed=0, limit=conversations, max_chars=max_chars)
    write_jsonl(out / "instructions.jsonl", records)
    console.print(f"{len(records)} conversations of at most {max_chars} characters (≈ the {context}-token context) "
                  f"→ {out / 'instructions.jsonl'}")
    prepare_chat([str(out / "instructions.jsonl")], base.path, out / "chat-data", val_fraction=0.02)
    prompts = held_out_prompts(out / "chat-data", FORMAT_QUESTIONS)
    before = format_share(base, prompts)

    budget = [f"train.max_steps={sft_steps}"] if sft_steps else [f"train.max_time={sft_seconds}",
                                                                  "train.max_steps=1000000"]
    console.rule(f"[bold]6/7 fine-tune[/]: supervised, from the pretrained model, for {budget[0].split('.')[1]}")
    config = sft_config(str(base.path), str(out / "chat-data"), SFT_SETTINGS + budget)
    result = train(config, out / "chat-run", init=str(base.path))
    if result.final_dir is None:  # Ctrl-C: a checkpoint was saved
        return {"final_dir": None, "exit_status": result.exit_status}

    console.rule("[bold]7/7 chat[/]: the fine-tuned model answers (samples with seed=0)")
    model = load(result.final_dir)
    for questions_asked in CHAT_SAMPLES:
        said = []
        for question in questions_asked:
            said.append({"role": "user", "content": question})
            reply = model.chat(said, seed=0, **CHAT_SAMPLING)
            said.append({"role": "assistant", "content": reply})
            print(f"user: {question}\nassistant: {reply}", flush=True)  # print: a reply's "[x]" is no markup
        console.rule(style="dim")
    after = format_share(model, prompts)
    for when, share in (("before fine-tuning", before), ("after fine-tuning", after)):
        console.print(f"{when}: {share['end_of_turn']} of {share['replies']} replies to the first questions of "
                      f"held-out conversations ended with the end-of-turn token ({share['length']} ran to the "
                      f"{CHAT_SAMPLING['max_tokens']}-token limit, {share['other']} ended the text or opened a new "
                      "turn)", highlight=False)
    return {"final_dir": result.final_dir, "steps": result.step, "conversations": len(records), "before": before,
            "after": after, "exit_status": 0}


def held_out_prompts(data: Path, count: int) -> list[list[int]]:
    """The first `count` validation conversations of chat data, each cut before its first reply (so ending with
    the template's assistant header): token ids of questions the fine-tuning never trained on."""
    from commonlm.data.chat import ChatData

    chats = ChatData(data)
    prompts = []
    for i in range(min(count, chats.conversations("val") if chats.has_split("val") else 0)):
        ids, targets = chats.conversation("val", i)
        prompts.append([int(t) for t in ids[: int(targets.argmax())]])  # the first target: the reply's first token
    return prompts


def format_share(model: LanguageModel, prompts: list[list[int]]) -> dict:
    """How the model's replies to `prompts` end (with CHAT_SAMPLING, seed i for prompt i): the end-of-turn
    token, the token limit, or something else (end of text, the start of a new turn)."""
    from commonlm.data.tokenizer import IM_END
    from commonlm.infer.generate import generate_ids

    tok, counts = model.tokenizer, {"replies": len(prompts), "end_of_turn": 0, "length": 0, "other": 0}
    for i, prompt in enumerate(prompts):
        room = min(CHAT_SAMPLING["max_tokens"], model.model.config.max_seq_len - len(prompt))
        ids = generate_ids(model.model, prompt, seed=i, stop_ids=tok.stop_ids, **{**CHAT_SAMPLING, "max_tokens": room})
        ending = ids[-1] if ids else None
        key = "end_of_turn" if ending == tok.token_id(IM_END) else "other" if ending in tok.stop_ids else "length"
        counts[key] += 1
    return counts
