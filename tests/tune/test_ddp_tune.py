"""Fine-tuning objectives under torchrun (two CPU processes, gloo on 127.0.0.1): SFT and DPO train like one
process with twice the micro-batch, and a DDP run stopped and resumed continues exactly."""

import json
import textwrap

import pytest

from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from commonlm.tune.dpo import dpo_config
from commonlm.tune.sft import sft_config
from tests.procs import torchrun
from tests.tune.conftest import base_and_data as make_base_and_data

from .test_dpo import pairs
from .test_sft import SMALL, conversations

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.micro_batch_size=2"]
MAKE = {"sft": sft_config, "dpo": dpo_config}


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_ddp_matches_one_process_and_resumes_exactly(objective, tmp_path):
    records = conversations(40) if objective == "sft" else pairs(40)
    base, data = make_base_and_data(tmp_path, records, val_fraction=0.2, preference=objective == "dpo")
    overrides = SMALL + STEPS
    # one torchrun: an uninterrupted run, then a run stopped after step 2 and resumed (all in the same two
    # processes, so the test pays for one start-up)
    script = tmp_path / "ddp_tune.py"
    script.write_text(textwrap.dedent(f"""
        from commonlm.train.trainer import resume_config, train
        from commonlm.tune.{objective} import {objective}_config as make
        config = make({str(base)!r}, {str(data)!r}, {overrides!r})
        train(config, {str(tmp_path / "ddp")!r}, init={str(base)!r})
        train(make({str(base)!r}, {str(data)!r}, {overrides!r}), {str(tmp_path / "split")!r}, init={str(base)!r},
              stop_at_step=2)
        train(resume_config({str(tmp_path / "split")!r}), {str(tmp_path / "split")!r}, resume=True)
    """))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # one process, twice the micro-batch: the same items per step (each rank takes its block of the order)
    single = MAKE[objective](str(base), str(data), SMALL + STEPS + ["train.micro_batch_size=4"])
    train(single, tmp_path / "single", init=base)
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(ddp) == len(one) == 4
    assert max(abs(a - b) for a, b in zip(ddp, one)) < 1e-4, (ddp, one)
    assert losses(tmp_path / "split") == ddp  # resumed under DDP: value for value
    vals = [r for r in read_metrics(tmp_path / "ddp") if "val_loss" in r]
    assert vals and json.loads((tmp_path / "ddp" / "final" / "config.json").read_text())
