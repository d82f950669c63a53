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
