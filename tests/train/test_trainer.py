"""The training loop: exact resume, crash safety, accumulation, guards, schedules."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from commonlm.config import TrainConfig, load_config
from commonlm.errors import UserError
from commonlm.train.checkpoint import latest_checkpoint, list_checkpoints
from commonlm.train.metrics import read_metrics
from commonlm.train.optim import lr_at
from commonlm.train.trainer import resume_config, train
from tests.procs import LAST_RESORT_S, commonlm_cmd, run_captured, running, started, wait_for

SMALL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=32",
         "train.micro_batch_size=4", "train.dtype=fp32", "train.log_every=1", "train.eval_every=0",
         "train.warmup_steps=3", "train.threads=1"]


def small_config(data, *overrides):
    config = load_config("tiny", SMALL + list(overrides))
    config.data.path = str(data)
    return config


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_reproduces_the_uninterrupted_run_exactly(byte_data, tmp_path, dtype):
    steps = ["train.max_steps=10", "train.ckpt_every=3", f"train.dtype={dtype}", "train.lr=3e-3"]
    full = train(small_config(byte_data, *steps), tmp_path / "full")
    part = train(small_config(byte_data, *steps), tmp_path / "part", stop_at_step=5)
    assert part.stopped_because == "stop_at_step" and part.final_dir is None
    assert latest_checkpoint(tmp_path / "part").name == "step_000005"
    resumed = train(small_config(byte_data, *steps), tmp_path / "part", resume=True)

    assert resumed.step == full.step == 10
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "part")  # value for value
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_validation_loss_and_writes_a_model_directory(byte_data, tmp_path):
    result = train(small_config(byte_data, "train.max_steps=40", "train.lr=3e-3", "train.eval_every=20"),
                   tmp_path / "run")
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[-1]["val_bpb"] > 0
    names = {p.name for p in result.final_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "commonlm.yaml"} <= names
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    record = next(r for r in read_metrics(tmp_path / "run") if "loss" in r)
    assert record["tok_per_s"] > 0 and 0 < record["mfu"] < 1


def test_keep_last_prunes_old_checkpoints(byte_data, tmp_path):
    train(small_config(byte_data, "train.max_steps=8", "train.ckpt_every=2", "train.keep_last=2"), tmp_path / "r")
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_000006", "step_000008"]


def test_gradient_accumulation_matches_one_big_batch(byte_data, tmp_path):
    big = train(small_config(byte_data, "train.max_steps=3", "train.micro_batch_size=8"), tmp_path / "big")
    acc = train(small_config(byte_data, "train.max_steps=3", "train.tokens_per_step=256"), tmp_path / "acc")
    # 8 x 32 tokens in one pass vs 2 x (4 x 32): same windows, same mean loss, same update
    for x, y in zip(train_losses(tmp_path / "big"), train_losses(tmp_path / "acc")):
        assert abs(x - y) < 1e-5
    for (k, a), b in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(byte_data, tmp_path):
    train(small_config(byte_data, "train.max_steps=2"), tmp_path / "r")
    with pytest.raises(UserError, match="already holds a run"):
        train(small_config(byte_data, "train.max_steps=2"), tmp_path / "r")
    with pytest.raises(UserError, match="no checkpoint"):
        train(small_config(byte_data, "train.max_steps=2"), tmp_path / "empty", resume=True)


def _poisoned_model(data, directory):
    """A model directory whose weights hold a NaN (as a damaged or diverged model would)."""
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.model.decoder import Decoder
    from commonlm.modeldir import save_model_dir
    from commonlm.train.trainer import resolve_vocab

    config = small_config(data)
    tok = Tokenizer.load(data)
    resolve_vocab(config, tok)
    model = Decoder(config.model)
    with torch.no_grad():
        model.blocks[0].mlp.proj.weight[0, 0] = float("nan")
    return save_model_dir(directory, model, tok, config)


def test_non_finite_loss_stops_with_a_clear_message(byte_data, tmp_path):
    init = _poisoned_model(byte_data, tmp_path / "nan-model")
    config = small_config(byte_data, "train.max_steps=30", "train.nonfinite=stop")
    with pytest.raises(UserError, match="non-finite loss .* at step 0: training stopped"):
        train(config, tmp_path / "r", init=init)


def test_non_finite_loss_is_skipped_then_stops_after_too_many(byte_data, tmp_path):
    init = _poisoned_model(byte_data, tmp_path / "nan-model")
    config = small_config(byte_data, "train.max_steps=30", "train.nonfinite=skip", "train.max_nonfinite=3")
    with pytest.raises(UserError, match="at step 2: training stopped"):  # steps 0 and 1 were skipped
        train(config, tmp_path / "r", init=init)


def test_skipped_steps_between_log_steps_leave_the_weights_alone(byte_data, tmp_path):
    """With log steps 10 apart the host looks at the loss only then: the optimizer itself skips each
    non-finite step on the device (fused AdamW), so nothing of the poisoned weights moves, and the run
    says how many steps it skipped when it looks."""
    from commonlm.modeldir import load_model_dir

    init = _poisoned_model(byte_data, tmp_path / "nan-model")
    config = small_config(byte_data, "train.max_steps=4", "train.log_every=10", "train.nonfinite=skip",
                          "train.max_nonfinite=100", "train.ckpt_every=0")
    result = train(config, tmp_path / "r", init=init)
    before = load_model_dir(init)[0].state_dict()
    after = result.model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)  # (NaN != NaN)
    assert result.step == 4 and result.stopped_because == "max_steps"


def test_early_stopping_on_validation_patience(byte_data, tmp_path):
    # a learning rate far too high makes validation loss go up; patience 2 stops the run early
    config = small_config(byte_data, "train.max_steps=200", "train.lr=0.5", "train.warmup_steps=0",
                          "train.eval_every=2", "train.patience=2", "train.schedule=constant")
    result = train(config, tmp_path / "r")
    assert result.stopped_because == "patience"
    assert result.step < 200 and result.final_dir is not None


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(80, wsd) == pytest.approx(1.0)  # still stable at 70% of the post-warmup steps
    assert lr_at(100, wsd) == pytest.approx(0.5)  # halfway through the decay
    assert lr_at(50, wsd, time_fraction=0.9) == pytest.approx(0.5)  # a time budget pulls the decay forward
    assert lr_at(500, TrainConfig(lr=2.0, schedule="constant", warmup_steps=0)) == 2.0


def _run_script(body: str, tmp_path, *args):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return run_captured([sys.executable, str(script), *args])


def test_sigkill_while_saving_leaves_the_previous_checkpoint(byte_data, tmp_path):
    run = tmp_path / "r"
    train(small_config(byte_data, "train.max_steps=4", "train.ckpt_every=2"), run, stop_at_step=2)
    # a second process dies by SIGKILL half-way through writing the next checkpoint
    proc = _run_script(f"""
        import os, signal
        import commonlm.train.checkpoint as ckpt
        from commonlm.config import load_config
        from commonlm.train.trainer import train
        real = ckpt.write_model_files
        def dying(directory, *a, **k):
            real(directory, *a, **k)
            (directory / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.write_model_files = dying
        config = load_config("tiny", {SMALL + ["train.max_steps=4", "train.ckpt_every=2"]!r})
        config.data.path = {str(byte_data)!r}
        train(config, {str(run)!r}, resume=True)
    """, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(run).name == "step_000002"
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    result = train(small_config(byte_data, "train.max_steps=4", "train.ckpt_every=2"), run, resume=True)
    assert result.step == 4 and result.final_dir is not None
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_skips_the_pending_evaluation_and_saves_at_once(byte_data, tmp_path, monkeypatch, sig):
    import commonlm.train.trainer as trainer

    def lr_at_and_signal(step, *args, **kwargs):
        if step == 4:  # during the fifth step, after which an evaluation is due
            os.kill(os.getpid(), sig)
        return lr_at(step, *args, **kwargs)

    monkeypatch.setattr(trainer, "lr_at", lr_at_and_signal)
    config = small_config(byte_data, "train.max_steps=20", "train.eval_every=5", "train.ckpt_every=0")
    result = train(config, tmp_path / "r")
    assert result.stopped_because == "signal" and result.step == 5 and result.final_dir is None
    assert [r["step"] for r in read_metrics(tmp_path / "r") if "val_loss" in r] == [0]  # none at step 5
    assert result.stop_signal == sig and result.exit_status == 128 + sig  # 130 for SIGINT, 143 for SIGTERM
    assert latest_checkpoint(tmp_path / "r").name == "step_000005"


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_commonlm_train_stopped_by_a_signal_saves_and_exits_128_plus_the_signal(byte_data, tmp_path, sig, status):
    run_dir, log = tmp_path / "r", tmp_path / "out.txt"
    cmd = commonlm_cmd("train", "--config", "tiny", "--data", byte_data, "--out", run_dir,
                       *[a for s in SMALL + ["train.max_steps=100000", "train.ckpt_every=0"] for a in ("--set", s)])
    with open(log, "w") as sink, started(cmd, stdout=sink, stderr=subprocess.STDOUT) as proc:
        wait_for(lambda: len(train_losses(run_dir)) >= 5, "five training steps", running(proc))  # then signal
        proc.send_signal(sig)
        proc.wait(timeout=LAST_RESORT_S)
    out = log.read_text()
    assert proc.returncode == status, out
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and not (run_dir / "final").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] >= 5 and "resume with" in out and "Traceback" not in out
    assert math.isfinite(train_losses(run_dir)[-1])


def test_a_target_validation_loss_stops_the_run_and_saves_the_model(byte_data, tmp_path):
    result = train(small_config(byte_data, "train.max_steps=50", "train.eval_every=2", "train.eval_tokens=512",
                                "train.target_val_loss=50"), tmp_path / "r")
    assert result.stopped_because == "target_val_loss" and result.step == 2  # the first evaluation reaches it
    assert result.final_dir is not None and result.val["val_loss"] <= 50
    far = train(small_config(byte_data, "train.max_steps=4", "train.eval_every=2", "train.eval_tokens=512",
                             "train.target_val_loss=0.01"), tmp_path / "far")
    assert far.stopped_because == "max_steps" and far.step == 4


def test_data_that_is_not_a_prepared_directory_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match="not a prepared data directory"):
        train(small_config(tmp_path / "nowhere", "train.max_steps=1"), tmp_path / "r")


def test_each_start_of_a_run_is_recorded(byte_data, tmp_path):
    """run_info.json: the machine and code of the first start and of every resume, for `commonlm report`."""
    import json

    train(small_config(byte_data, "train.max_steps=4", "train.ckpt_every=2"), tmp_path / "r", stop_at_step=2)
    train(resume_config(tmp_path / "r"), tmp_path / "r", resume=True)
    starts = json.loads((tmp_path / "r" / "run_info.json").read_text())
    assert [s["step"] for s in starts] == [0, 2]
    assert all(s["torch"] == torch.__version__ and s["processes"] == 1 and "CPU" in s for s in starts)
