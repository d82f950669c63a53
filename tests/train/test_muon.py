"""train.optimizer=muon: Muon's orthogonalised updates on the hidden matrices, AdamW on the rest, in the one loop
(gradient accumulation, exact resume, the loop's learning rate)."""

import pytest
import torch
from safetensors.torch import load_file

from commonlm.config import ModelConfig, TrainConfig
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder
from commonlm.train.optim import MuonWithAdamW, make_optimizer
from commonlm.train.trainer import train
from tests.train.test_trainer import small_config, train_losses

MUON = ["train.optimizer=muon", "train.lr=3e-3"]


def _one_step(cfg: TrainConfig, seed: int = 0):
    """A tiny decoder, a gradient with widely spread singular values on every matrix, one optimizer step:
    (model, optimizer, update of each parameter by name)."""
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(n_layer=1, n_head=4, d_model=64, vocab_size=128, max_seq_len=16, tie_embeddings=False))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:  # U diag(s) V^T with s from 0.1 to 10: far from orthogonal
            u, _ = torch.linalg.qr(torch.randn(p.shape[0], p.shape[0], generator=g))
            v, _ = torch.linalg.qr(torch.randn(p.shape[1], p.shape[1], generator=g))
            k = min(p.shape)
            p.grad = u[:, :k] @ torch.diag(torch.logspace(-1, 1, k)) @ v[:, :k].T
        else:
            p.grad = torch.randn(p.shape, generator=g)
    for group in optimizer.param_groups:  # as the loop does
        group["lr"] = cfg.lr
    optimizer.step()
    return model, optimizer, {name: p.detach() - before[name] for name, p in model.named_parameters()}


def test_hidden_matrices_get_orthogonal_updates_and_the_rest_adamw():
    cfg = TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.0)
    model, optimizer, update = _one_step(cfg)
    assert isinstance(optimizer, MuonWithAdamW)
    on_muon = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in on_muon}
    assert names == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.gate_up.weight",
                     "blocks.0.mlp.proj.weight"}
    for name in names:
        s = torch.linalg.svdvals(update[name])
        # Newton-Schulz (5 steps, Keller Jordan's coefficients) puts every singular value near 1 (0.7..1.2)
        assert s.max() / s.min() < 2.0, (name, s.min().item(), s.max().item())
        # match_rms_adamw: the update's RMS is 0.2 x lr, as AdamW's typically is
        rms = update[name].pow(2).mean().sqrt().item()
        assert 0.14 * cfg.lr < rms < 0.26 * cfg.lr, (name, rms)
    # the embeddings and the head are AdamW's: their first step is lr x sign(grad), not orthogonal
    s = torch.linalg.svdvals(update["embed.weight"])
    assert s.max() / s.min() > 5
    assert torch.allclose(update["lm_head.weight"].abs(), torch.full_like(update["lm_head.weight"], cfg.lr), rtol=1e-3)


def test_muon_follows_the_loops_lr_times_the_ratio():
    base = _one_step(TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.0))[2]
    doubled = _one_step(TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.0, muon_lr_ratio=2.0))
    update, optimizer = doubled[2], doubled[1]
    assert torch.allclose(update["blocks.0.mlp.proj.weight"], 2 * base["blocks.0.mlp.proj.weight"], atol=1e-7)
    assert torch.allclose(update["embed.weight"], base["embed.weight"])
    assert all(group["lr"] == 1e-2 for group in optimizer.param_groups)  # the loop's value, left as it set it


def test_adamw_stays_a_plain_fused_adamw():
    optimizer = make_optimizer(Decoder(ModelConfig(vocab_size=64, n_layer=1)), TrainConfig(), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)


def _largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_gradient_accumulation_matches_one_big_batch(byte_data, tmp_path):
    # 8 x 32 tokens in one pass vs 2 x (4 x 32): the same gradient up to fp32 summation order. Muon's Newton-Schulz
    # runs in bf16 (as torch.optim.Muon does it), where such differences can round apart: the first step's
    # updates are equal, the second's within 4e-5 here; from the third on they drift apart (to ~1e-3 by step 3)
    big = train(small_config(byte_data, *MUON, "train.max_steps=2", "train.micro_batch_size=8"), tmp_path / "big")
    acc = train(small_config(byte_data, *MUON, "train.max_steps=2", "train.tokens_per_step=256"), tmp_path / "acc")
    for x, y in zip(train_losses(tmp_path / "big"), train_losses(tmp_path / "acc")):
        assert abs(x - y) < 1e-5
    # half the batch (its first micro-batch only) moves the weights much further than rounding does
    half = train(small_config(byte_data, *MUON, "train.max_steps=2"), tmp_path / "half")
    assert _largest_difference(big.model, acc.model) < 1e-4 < _largest_difference(big.model, half.model)


def test_resume_reproduces_the_uninterrupted_run_exactly(byte_data, tmp_path):
    steps = [*MUON, "train.max_steps=8", "train.ckpt_every=3"]
    full = train(small_config(byte_data, *steps), tmp_path / "full")
    train(small_config(byte_data, *steps), tmp_path / "part", stop_at_step=4)
    resumed = train(small_config(byte_data, *steps), tmp_path / "part", resume=True)
    losses = train_losses(tmp_path / "full")
    assert losses == train_losses(tmp_path / "part")  # value for value
    assert losses[-1] < losses[0] - 0.5  # and it trains
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an AdamW-only run differs: Muon really stepped
    train(small_config(byte_data, "train.lr=3e-3", "train.max_steps=8"), tmp_path / "adamw")
    assert train_losses(tmp_path / "adamw")[-1] != losses[-1]


@pytest.mark.parametrize("setting,match", [("muon_momentum=1.0", "train.muon_momentum"),
                                           ("muon_ns_steps=0", "train.muon_ns_steps"),
                                           ("muon_lr_ratio=0", "train.muon_lr_ratio")])
def test_bad_settings_are_one_line_errors(setting, match):
    name, value = setting.split("=")
    cfg = TrainConfig(optimizer="muon", **{name: type(getattr(TrainConfig(), name))(float(value))})
    with pytest.raises(UserError, match=match):
        cfg.validate()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "hsdp"])
def test_muon_shards(parallel):
    TrainConfig(optimizer="muon", parallel=parallel).validate()  # (tests/train/test_fsdp_muon.py runs it)
