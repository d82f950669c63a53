"""A model the transformers class cannot hold whole is never written as a transformers directory.

Saving used to write the tensors it had names for and check a fixed list of settings, so a model with a
new part (or a setting the class lacks) became a plain Llama directory that loaded without it.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.hf import hf_incompatibility
from commonlm.model.decoder import Decoder, RMSNorm
from commonlm.modeldir import load_model_dir, load_weights, read_run_config, save_model_dir

transformers = pytest.importorskip("transformers")

LLAMA = dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, vocab_size=264)


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _scale_mlp(model):
    """A new parameter: a learned scale on the first block's MLP output (as a LoRA or gate weight would be)."""
    mlp = model.blocks[0].mlp
    mlp.scale = torch.nn.Parameter(torch.full((model.config.d_model,), 1.5))
    mlp.register_forward_hook(lambda module, args, out: out * module.scale)


def _extra_norm(model):
    """A new module: one more RMSNorm after the last block's second norm."""
    block = model.blocks[-1]
    block.extra_norm = RMSNorm(model.config.d_model, model.config.norm_eps)
    block.norm2.register_forward_hook(lambda module, args, out: block.extra_norm(out))


def _drop_qk_norm(model):
    """A part removed: the first block of a Qwen3 model without its QK-norm (transformers would make fresh ones)."""
    model.blocks[0].attn.q_norm = model.blocks[0].attn.k_norm = None


PARTS = {
    "extra parameter": (LLAMA, _scale_mlp, "blocks.0.mlp.scale"),
    "extra norm": (LLAMA, _extra_norm, "blocks.1.extra_norm.weight"),
    "missing qk-norm": ({**LLAMA, "family": "qwen3", "qk_norm": True}, _drop_qk_norm, "blocks.0.attn.q_norm.weight"),
}


def _native_note(directory):
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["model_type"] == "commonlm" and cfg["architectures"] == ["CommonLMForCausalLM"]
    with pytest.raises((ValueError, KeyError)):  # transformers refuses it rather than loading something else
        transformers.AutoModelForCausalLM.from_pretrained(directory)
    return cfg["commonlm_note"]


@pytest.mark.parametrize("case", sorted(PARTS))
def test_a_model_with_a_part_the_class_lacks_is_saved_natively_and_loads_back(case, tmp_path):
    fields, change, tensor = PARTS[case]
    config = ModelConfig(**fields)
    torch.manual_seed(0)
    model = Decoder(config).eval()
    change(model)
    _randomize(model)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))

    assert tensor in _native_note(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) - {"lm_head.weight"}  # every tensor under our name, the tied head once
    assert all(torch.equal(saved[k], state[k]) for k in saved)

    # our loader refuses to drop the part (or to invent the missing one) ...
    with pytest.raises(UserError, match="weights do not match commonlm.yaml"):
        load_model_dir(tmp_path / "m")
    # ... and a model that has the same parts loads it with identical logits
    again = Decoder(config).eval()
    change(again)
    load_weights(tmp_path / "m", again, read_run_config(tmp_path / "m")[1])
    idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_setting_the_class_lacks_is_saved_natively_and_loads_back(family, tmp_path):
    """Our dropout also drops embeddings; transformers' Llama, Mistral and Qwen classes have no such dropout."""
    config = ModelConfig(**{**LLAMA, "family": family, "qk_norm": family == "qwen3", "qkv_bias": family == "qwen2"},
                         dropout=0.1)
    assert hf_incompatibility(dataclasses.replace(config, dropout=0.0)) is None
    torch.manual_seed(0)
    model = Decoder(config).eval()
    _randomize(model)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))

    assert "model.dropout=0.1" in _native_note(tmp_path / "m")
    again, _, saved = load_model_dir(tmp_path / "m")
    assert saved.model.dropout == 0.1
    idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again.eval()(idx)[0], model(idx)[0])


def test_gpt2_dropout_is_written_as_gpt2s_own(tmp_path):
    """GPT-2's class has embedding and attention dropout as ours, and a residual dropout ours lacks: 0."""
    config = ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True, n_layer=2,
                         n_head=4, d_model=64, max_seq_len=32, vocab_size=264, dropout=0.1)
    assert hf_incompatibility(config) is None
    save_model_dir(tmp_path / "m", Decoder(config), Tokenizer.byte_level(), RunConfig(model=config))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    assert (theirs.embd_pdrop, theirs.attn_pdrop, theirs.resid_pdrop) == (0.1, 0.1, 0.0)


def test_a_config_field_added_later_is_checked_too():
    """Every field of the config must read back from the family's config.json: one added later (say, a number
    of experts) keeps a model a transformers one only at its default."""

    @dataclasses.dataclass
    class WithExperts(ModelConfig):
        n_experts: int = 0

    assert hf_incompatibility(WithExperts(**LLAMA)) is None
    assert "model.n_experts=8" in hf_incompatibility(WithExperts(**LLAMA, n_experts=8))


def test_a_transformers_directory_with_an_extra_tensor_is_refused_on_load(tmp_path):
    """Loading read the names it knew and ignored the rest."""
    config = ModelConfig(**LLAMA)
    save_model_dir(tmp_path / "m", Decoder(config), Tokenizer.byte_level(), RunConfig(model=config))
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "model.layers.0.mlp.experts.0.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(UserError, match=r"unexpected weights \['model.layers.0.mlp.experts.0.weight'\]"):
        load_model_dir(tmp_path / "m")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_experts_or_latent_attention_in_a_dense_family_name_the_family_that_holds_them(family):
    base = dict(family=family, n_layer=2, n_head=4, d_model=64, vocab_size=320, qk_norm=family == "qwen3")
    experts = hf_incompatibility(ModelConfig(**base, n_experts=4, experts_per_token=2))
    assert "n_experts=4" in experts and "model.family=qwen3_moe model.qk_norm=true" in experts
    latent = hf_incompatibility(ModelConfig(**base, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                            v_head_dim=8))
    assert "kv_lora_rank=16" in latent and "model.family=deepseek_v3" in latent
    # the family the hint names holds it
    assert hf_incompatibility(ModelConfig(**{**base, "family": "qwen3_moe", "qk_norm": True}, n_experts=4,
                                          experts_per_token=2)) is None
