"""Fine-tuning on a GPU, through the one loop, as on the CPU (tests/tune): SFT with packed rows, LoRA, QLoRA on
an int4 base, Muon, and GRPO's rollouts through the engine under bf16 autocast. Run where a GPU is
(`bench/gpu_session.sh`); each checks that the run trains, not how fast."""

import pytest
import torch

from commonlm.data.arithmetic import problems, prompt_records, sft_records
from commonlm.data.prompts import prepare_prompts
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from commonlm.tune.grpo import grpo_config
from commonlm.tune.sft import sft_config
from commonlm.utils import write_jsonl
from tests.tune.conftest import base_and_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = ["train.device=cuda", "train.dtype=bf16", "train.log_every=1", "train.eval_every=0", "train.lr=3e-3",
        "train.warmup_steps=2", "train.micro_batch_size=16"]


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.mark.parametrize("extra", [[], ["train.lora_rank=8"], ["train.lora_rank=8", "train.base_quant=int4"],
                                   ["train.optimizer=muon"]], ids=["full", "lora", "qlora-int4", "muon"])
def test_sft_trains_on_the_gpu(extra, tmp_path):
    base, chat = base_and_data(tmp_path, sft_records(problems(200, seed=1, digits=1)), val_fraction=0.1)
    result = train(sft_config(str(base), str(chat), CUDA + ["train.max_steps=30", *extra]), tmp_path / "run",
                   init=base)
    got = losses(tmp_path / "run")
    assert result.stopped_because == "max_steps" and result.final_dir is not None
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5, got


def test_grpo_rolls_out_and_updates_on_the_gpu(tmp_path):
    base, chat = base_and_data(tmp_path, sft_records(problems(200, seed=1, digits=1)), val_fraction=0.1)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(problems(40, seed=2, digits=1)))
    prepare_prompts([str(prompts)], base, tmp_path / "prompts", val_fraction=0.2)
    config = grpo_config(str(base), str(tmp_path / "prompts"),
                         CUDA + ["train.reward=gsm8k", "train.max_steps=3", "train.micro_batch_size=2",
                                 "train.grpo_max_new_tokens=8", "train.eval_every=3"])
    result = train(config, tmp_path / "grpo", init=base)
    records = read_metrics(tmp_path / "grpo")
    assert result.stopped_because == "max_steps"
    assert all(0 <= r["completion_length"] <= 9 for r in records if "completion_length" in r)
    assert any("val_reward" in r for r in records)
