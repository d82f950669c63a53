"""Under DDP a mixture of experts logs its router metrics over all ranks' tokens: two processes log what one process
with twice the batch logs (the same windows), not each rank's own half."""

import pytest

from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from tests.train.test_ddp import train_under_torchrun
from tests.train.test_trainer import SMALL, small_config

MOE = ["model.n_experts=4", "model.experts_per_token=2", "model.expert_ff_dim=32", "model.router_bias=true",
       "model.balance_rate=0.01", "train.max_steps=4", "train.lr=3e-3"]
ROUTER = ["moe_balance", "moe_balance_max", "moe_router_entropy", "moe_over_capacity", "moe_over_capacity_frac",
          "moe_bias_spread"]


def router_log(run_dir):
    return [{k: r[k] for k in ROUTER} for r in read_metrics(run_dir) if "moe_balance" in r]


@pytest.mark.slow
def test_two_process_router_metrics_are_those_of_all_tokens(byte_data, tmp_path):
    train_under_torchrun(byte_data, SMALL + MOE, tmp_path / "ddp")

    # one process with micro_batch 8 sees the same windows as two processes with 4 each
    train(small_config(byte_data, *MOE, "train.micro_batch_size=8"), tmp_path / "single")
    ddp, single = router_log(tmp_path / "ddp"), router_log(tmp_path / "single")
    assert len(ddp) == len(single) == 4
    for step, (a, b) in enumerate(zip(ddp, single), start=1):
        for key in ROUTER:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (step, key, a[key], b[key])
    # a rank's own half would count half the copies over capacity: the test tells the two apart
    assert any(r["moe_over_capacity"] > 0 for r in single)
