"""Router metrics of a mixture of experts (model/moe.py `router_metrics`): load balance, router entropy, the
over-capacity count and the balancing bias's spread, checked against numbers computed here from the routing
itself, and written by a real `commonlm train` run into metrics.jsonl and the log line."""

import math

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.model.decoder import Decoder
from commonlm.model.moe import MoE, router_metrics
from commonlm.train.metrics import read_metrics
from tests.procs import commonlm_cmd, run_captured


def _skewed(top_k: int) -> tuple[MoE, torch.Tensor]:
    """A router that sends every token to expert 0 with all its weight: feature 0 of every token is 1 and only
    expert 0's router row reads it, with a large weight."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig(d_model=16, n_experts=4, experts_per_token=top_k, expert_ff_dim=8))
    moe.reset_parameters()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 60.0
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 1.0
    return moe, x


def test_a_router_that_sends_everything_to_one_expert():
    moe, x = _skewed(top_k=1)
    moe.train()(x)
    m = router_metrics(moe)
    assert m["moe_balance"] == pytest.approx(4.0) and m["moe_balance_max"] == pytest.approx(4.0)
    assert m["moe_balance_layer0"] == pytest.approx(4.0)
    assert m["moe_router_entropy"] == pytest.approx(0.0, abs=1e-6)
    # capacity 40 / 4 = 10 copies per expert: expert 0 ran all 40, so 30 over
    assert m["moe_over_capacity"] == 30 and m["moe_over_capacity_frac"] == pytest.approx(0.75)
    assert "moe_bias_spread" not in m  # (no balancing bias without balance_rate)


def test_the_balancing_bias_skews_the_choice_but_not_the_router_entropy():
    """The bias picks the experts, the scores weigh them: an even router pushed onto one expert by its bias has
    the worst balance and the highest entropy."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig(d_model=16, n_experts=4, experts_per_token=1, expert_ff_dim=8, balance_rate=1e-3))
    moe.reset_parameters()
    with torch.no_grad():
        moe.router.weight.zero_()  # every score 1/4
        moe.balance_bias.copy_(torch.tensor([0.5, 0.0, -0.25, 0.0]))
    moe.eval()(torch.randn(1, 40, 16))  # (eval: the bias stays as set)
    m = router_metrics(moe)
    assert m["moe_balance"] == pytest.approx(4.0)
    assert m["moe_router_entropy"] == pytest.approx(1.0)
    assert m["moe_bias_spread"] == pytest.approx(0.75)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_metrics_are_those_of_each_layers_routing(score):
    torch.manual_seed(0)
    config = ModelConfig(n_layer=3, n_head=2, d_model=32, max_seq_len=16, vocab_size=64, n_experts=6,
                         experts_per_token=2, expert_ff_dim=16, router_score=score, balance_rate=0.05)
    model = Decoder(config).train()
    inputs: list[torch.Tensor] = []
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        moe.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().reshape(-1, 32)))
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    model(idx)  # (the first forward measures the load; the second moves the bias by it)
    inputs.clear()
    model(idx)
    m = router_metrics(model)

    balances, entropies, over = [], [], 0.0
    for moe, x in zip(moes, inputs):
        chosen, _, scores = moe.route(x)  # (the same bias as that forward: it moves before routing)
        counts = torch.zeros(6).index_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
        capacity = chosen.numel() / 6
        balances.append(counts.max().item() / capacity)
        over += (counts - capacity).clamp_min(0).sum().item()
        p = scores / scores.sum(-1, keepdim=True)
        entropies.append((-(p * p.log()).sum(-1) / math.log(6)).mean().item())
    assert len(inputs) == 3 and max(balances) > 1.0
    for i, b in enumerate(balances):
        assert m[f"moe_balance_layer{i}"] == pytest.approx(b)
    assert m["moe_balance"] == pytest.approx(sum(balances) / 3) and m["moe_balance_max"] == pytest.approx(max(balances))
    assert m["moe_router_entropy"] == pytest.approx(sum(entropies) / 3, rel=1e-5)
    assert m["moe_over_capacity"] == round(over)
    assert m["moe_over_capacity_frac"] == pytest.approx(over / (3 * 3 * 16 * 2))
    spread = max((moe.balance_bias.max() - moe.balance_bias.min()).item() for moe in moes)
    assert spread > 0 and m["moe_bias_spread"] == pytest.approx(spread)


def test_a_model_without_experts_has_no_router_metrics():
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=16, vocab_size=64))
    model(torch.zeros(1, 4, dtype=torch.long))
    assert router_metrics(model) == {}


def test_commonlm_train_logs_the_router_metrics(byte_data, tmp_path):
    sets = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=32", "model.n_experts=4",
            "model.experts_per_token=2", "model.expert_ff_dim=32", "model.balance_rate=1e-3",
            "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=3", "train.eval_every=0",
            "train.ckpt_every=0", "train.warmup_steps=2", "train.threads=1", "train.dtype=fp32"]
    proc = run_captured(commonlm_cmd("train", "--config", "tiny", "--data", byte_data, "--out", tmp_path / "run",
                                     *[a for s in sets for a in ("--set", s)]))
    assert proc.returncode == 0, proc.stderr
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        assert 1.0 <= r["moe_balance"] <= r["moe_balance_max"] <= 4.0
        assert (r["moe_balance_layer0"] + r["moe_balance_layer1"]) / 2 == pytest.approx(r["moe_balance"])
        assert 0.0 < r["moe_router_entropy"] <= 1.0
        assert r["moe_over_capacity"] >= 0 and 0.0 <= r["moe_over_capacity_frac"] < 1.0
        assert r["moe_bias_spread"] > 0  # (the bias moved after the first step)
    assert "MoE balance" in proc.stdout + proc.stderr
