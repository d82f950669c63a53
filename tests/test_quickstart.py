"""The quickstart runs the whole spine on the standard library and reports before/after numbers."""

import pytest

from commonlm.api import load
from commonlm.quickstart import PROMPTS, SAMPLING, quickstart


@pytest.mark.slow
def test_quickstart_trains_and_improves(tmp_path, capsys):
    report = quickstart(out=tmp_path / "qs", max_steps=40)
    assert report["after"]["val_loss"] < report["before"]["val_loss"] - 1.0
    assert report["after"]["val_bpb"] < report["before"]["val_bpb"]
    for part in ("tokenizer/tokenizer.json", "data/index.json", "run/loss.png", "run/final/model.safetensors"):
        assert (tmp_path / "qs" / part).is_file(), part
    printed = capsys.readouterr().out
    # the samples it prints are the saved model's own seeded continuations, not just the prompts
    model = load(report["final_dir"])
    continuations = [model.generate(prompt, seed=i, **SAMPLING) for i, prompt in enumerate(PROMPTS)]
    assert any(continuations)
    for prompt, continuation in zip(PROMPTS, continuations):
        assert prompt + continuation in printed, (prompt, continuation)


@pytest.mark.slow
def test_quickstart_stopped_by_ctrl_c_saves_and_exits_130(tmp_path, monkeypatch):
    import os
    import signal

    import commonlm.train.trainer as trainer
    from commonlm.cli import main

    def lr_at_and_interrupt(step, *args, **kwargs):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *args, **kwargs)

    lr_at = trainer.lr_at
    monkeypatch.setattr(trainer, "lr_at", lr_at_and_interrupt)
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--seconds", "600"]) == 130  # not a traceback
    assert (tmp_path / "qs" / "run" / "checkpoints" / "step_000002").is_dir()


@pytest.mark.slow
def test_chat_quickstart_makes_a_chat_model(tmp_path, capsys, monkeypatch):
    import commonlm.quickstart as qs
    from commonlm.cli import build_parser
    from commonlm.data.chat import ChatData
    from commonlm.data.tokenizer import IM_END, IM_START

    args = build_parser().parse_args(["quickstart", "--chat", "--sft-seconds", "5"])
    assert args.chat and args.sft_seconds == 5 and args.out is None
    monkeypatch.setattr(qs, "FORMAT_QUESTIONS", 4)  # a tiny budget: few, short replies
    monkeypatch.setattr(qs, "CHAT_SAMPLING", {**qs.CHAT_SAMPLING, "max_tokens": 24})
    report = quickstart(out=tmp_path / "qs", max_steps=10, vocab_size=1024, chat=True, sft_steps=6, conversations=300)
    chat = report["chat"]
    assert report["exit_status"] == 0 and chat["steps"] == 6 and 250 < chat["conversations"] <= 300
    model = load(chat["final_dir"])
    prompts = qs.held_out_prompts(tmp_path / "qs" / "chat-data", 4)  # validation conversations' first questions
    assert 0 < len(prompts) == min(4, ChatData(tmp_path / "qs" / "chat-data").conversations("val"))
    for prompt in prompts:
        text = model.tokenizer.decode(prompt)
        assert text.endswith(f"{IM_START}assistant\n") and text.count(IM_START) == text.count(IM_END) + 1
    for share in (chat["before"], chat["after"]):
        assert share["replies"] == len(prompts) == share["end_of_turn"] + share["length"] + share["other"]
    assert model.config.train.objective == "sft" and model.config.train.init == str(report["final_dir"])
    messages = [{"role": "user", "content": "What does `len` do?"}]
    assert model.tokenizer.apply_chat_template(messages) == f"{IM_START}user\nWhat does `len` do?{IM_END}\n" \
        f"{IM_START}assistant\n"
    ids = model.tokenizer.encode_chat(messages)
    assert ids.count(model.tokenizer.token_id(IM_END)) == 1 and ids.count(model.tokenizer.token_id(IM_START)) == 2
    captured = capsys.readouterr()
    printed, told = captured.out, " ".join(captured.err.split())  # samples on stdout, the rest on stderr
    first = qs.CHAT_SAMPLES[0][0]  # the samples it prints are the fine-tuned model's own replies
    reply = model.chat([{"role": "user", "content": first}], seed=0, **qs.CHAT_SAMPLING)
    assert f"user: {first}\nassistant: {reply}\n" in printed
    assert f"commonlm chat {tmp_path / 'qs' / 'chat-run'}" in told
    assert f"after fine-tuning: {chat['after']['end_of_turn']} of {len(prompts)} replies" in told
