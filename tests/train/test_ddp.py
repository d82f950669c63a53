"""Two CPU processes under torchrun (gloo on 127.0.0.1) train like one process with twice the batch."""

import textwrap

import pytest
import torch
from safetensors.torch import load_file

from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from tests.procs import torchrun
from tests.train.test_trainer import SMALL, small_config, train_losses

STEPS = ["train.max_steps=6", "train.ckpt_every=3", "train.lr=3e-3"]


def train_under_torchrun(data, overrides: list[str], out, then: str = "") -> None:
    """`train` of the tiny preset with `overrides` on `data` into `out` in two processes under torchrun; `then`: more
    lines for each process to run after it (`result` is train's)."""
    script = out.parent / f"{out.name}_train.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from commonlm.config import load_config
        from commonlm.train.trainer import train
        config = load_config("tiny", {overrides!r})
        config.data.path = {str(data)!r}
        result = train(config, {str(out)!r})
    """) + textwrap.dedent(then))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_matches_single_process(byte_data, tmp_path):
    train_under_torchrun(byte_data, SMALL + STEPS, tmp_path / "ddp", then=f"""
        from safetensors.torch import save_file
        state = {{k: v.contiguous() for k, v in result.model.state_dict().items() if k != "lm_head.weight"}}
        save_file(state, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.safetensors")
    """)

    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    # one process with micro_batch 8 sees the same windows as two processes with 4 each
    single = train(small_config(byte_data, *STEPS, "train.micro_batch_size=8"), tmp_path / "single")
    ddp_losses, single_losses = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert len(ddp_losses) == len(single_losses) == 6
    assert max(abs(a - b) for a, b in zip(ddp_losses, single_losses)) < 1e-4
    for key, value in single.model.state_dict().items():
        if key in rank0:
            assert torch.allclose(rank0[key], value, atol=1e-4), key
    assert any("val_loss" in r for r in read_metrics(tmp_path / "ddp"))
