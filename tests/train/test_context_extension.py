"""`train --init MODEL --set model.max_seq_len=... model.rope_scaling=...`: a longer context on the same weights.

The continued model rotates exactly as a model built with that config directly; its directory records the
scaling, and transformers loads it with the same logits; a change that would reshape a weight is refused."""

import dataclasses
import json

import pytest
import torch

from commonlm.cli import main
from commonlm.config import ModelConfig, RunConfig
from commonlm.data.passkey import write_corpus
from commonlm.data.prepare import prepare
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder
from commonlm.modeldir import load_model_dir, save_model_dir
from commonlm.train.extend import continued_config, continued_model

BASE = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, vocab_size=320)


def randomized(config: ModelConfig) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(config).eval()
    with torch.no_grad():  # non-trivial norms too, so every tensor's place shows in the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def logits(model: Decoder, length: int) -> torch.Tensor:
    idx = torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(idx)[0]


@pytest.mark.parametrize("scaling", ["none", "linear", "dynamic", "yarn", "llama3"])
def test_continued_model_rotates_as_one_built_with_that_config(scaling):
    base = randomized(BASE)
    asked = dataclasses.replace(BASE, max_seq_len=128, rope_scaling=scaling, rope_factor=4.0 if scaling != "none"
                                else 1.0)
    extended = continued_model(base, asked, "base", torch.device("cpu"))
    original = 32 if scaling in ("dynamic", "yarn", "llama3") else 0  # the init model's context, where it is read
    assert extended.config == dataclasses.replace(asked, rope_original_len=original)
    direct = Decoder(dataclasses.replace(asked, rope_original_len=32))  # (linear ignores it)
    direct.load_state_dict(base.state_dict())
    assert torch.equal(logits(extended, 128), logits(direct, 128))
    if scaling != "none":  # the scaling is applied: plain positions would give other logits
        plain = Decoder(dataclasses.replace(BASE, max_seq_len=128))
        plain.load_state_dict(base.state_dict())
        assert not torch.allclose(logits(extended, 128), logits(plain, 128), atol=1e-4)


def test_shape_changes_are_refused_naming_the_field():
    for field, value in [("n_layer", 3), ("d_model", 96), ("vocab_size", 384), ("n_kv_head", 4)]:
        with pytest.raises(UserError, match=f"model.{field}={value}.*cannot change") as e:
            continued_config(BASE, dataclasses.replace(BASE, **{field: value}), "base")
        assert "\n" not in str(e.value)
    learned = dataclasses.replace(BASE, family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu")
    with pytest.raises(UserError, match="model.max_seq_len=128.*learned position table"):
        continued_config(learned, dataclasses.replace(learned, max_seq_len=128), "base")


def test_balancing_can_start_or_stop_with_init_where_the_router_keeps_its_bias():
    """A model directory leaves model.balance_rate out (modeldir.inference_form), so fine-tuning with balancing
    sets it again: the pending load starts empty, the trained bias and every weight are kept."""
    experts = dataclasses.replace(BASE, n_experts=4, experts_per_token=2, expert_ff_dim=32, router_bias=True)
    base = randomized(experts)
    with torch.no_grad():
        for block in base.blocks:
            block.mlp.balance_bias.copy_(torch.randn(4))
    balancing = continued_model(base, dataclasses.replace(experts, balance_rate=1e-3), "base", torch.device("cpu"))
    assert balancing.config.balance_rate == 1e-3
    assert all(torch.equal(block.mlp.balance_load, torch.zeros(4)) for block in balancing.blocks)
    assert torch.equal(logits(balancing, 32), logits(base, 32))
    stopped = continued_model(balancing, experts, "base", torch.device("cpu"))
    assert not hasattr(stopped.blocks[0].mlp, "balance_load") and torch.equal(logits(stopped, 32), logits(base, 32))
    # a router without a bias would gain one (or lose the one balancing stepped): refused in one line
    unbiased = dataclasses.replace(experts, router_bias=False)
    with pytest.raises(UserError, match="would add the router's bias"):
        continued_config(unbiased, dataclasses.replace(unbiased, balance_rate=1e-3), "base")
    with pytest.raises(UserError, match="would drop the router's bias"):
        continued_config(dataclasses.replace(unbiased, balance_rate=1e-3), unbiased, "base")


def test_a_config_without_model_settings_keeps_the_init_models():
    base = randomized(BASE)
    assert continued_model(base, ModelConfig(), "base", torch.device("cpu")) is base
    assert continued_model(base, dataclasses.replace(BASE), "base", torch.device("cpu")) is base
    asked = dataclasses.replace(BASE, rope_scaling="yarn", rope_factor=4.0, rope_original_len=16, max_seq_len=128)
    assert continued_config(BASE, asked, "base").rope_original_len == 16  # said explicitly: kept


@pytest.fixture
def base_and_data(tmp_path):
    base = randomized(BASE)
    save_model_dir(tmp_path / "base", base, Tokenizer.byte_level(), RunConfig(model=BASE))
    write_corpus(tmp_path / "passkey.jsonl", 60, 400, seed=0)
    prepare([str(tmp_path / "passkey.jsonl")], tmp_path / "base", tmp_path / "data", val_fraction=0.2, workers=1,
            progress=False)
    return tmp_path / "base", tmp_path / "data"


def train_args(base, data, out, *sets):
    return ["train", "--init", str(base), "--data", str(data), "--out", str(out), "--set", "train.max_steps=2",
            "train.micro_batch_size=2", "train.threads=1", "train.dtype=fp32", "train.eval_every=0",
            "train.eval_tokens=512", "train.warmup_steps=1", *sets]


def test_train_init_extends_the_context_and_transformers_loads_it(base_and_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, data = base_and_data
    sets = ["model.max_seq_len=128", "model.rope_scaling=yarn", "model.rope_factor=4"]
    assert main(train_args(base, data, tmp_path / "run", *sets)) == 0
    final = tmp_path / "run" / "final"
    ours, _, config = load_model_dir(final)
    assert (config.model.max_seq_len, config.model.rope_scaling, config.model.rope_factor,
            config.model.rope_original_len) == (128, "yarn", 4.0, 32)
    assert config.model == dataclasses.replace(BASE, max_seq_len=128, rope_scaling="yarn", rope_factor=4.0,
                                               rope_original_len=32)
    hf = json.loads((final / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["max_position_embeddings"] == 128
    assert hf["rope_parameters"]["rope_type"] == "yarn" and hf["rope_parameters"]["factor"] == 4.0
    assert hf["rope_parameters"]["original_max_position_embeddings"] == 32
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    idx = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.eval()(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4
    # it trained from the base's weights (two small steps away), not from a fresh initialisation
    start = load_model_dir(base)[0].state_dict()
    moved = max((p - start[name]).abs().max().item() for name, p in ours.state_dict().items())
    assert 0 < moved < 0.05


def test_train_init_refuses_a_shape_change_in_one_line(base_and_data, tmp_path, capsys):
    base, data = base_and_data
    assert main(train_args(base, data, tmp_path / "run", "model.n_head=8")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.n_head=8" in err and "cannot change" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
