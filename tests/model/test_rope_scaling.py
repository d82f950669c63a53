"""RoPE scaling (linear, dynamic NTK, YaRN, Llama 3) gives transformers' logits and greedy tokens, both ways."""

import dataclasses
import json

import pytest
import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.generate import generate_ids
from commonlm.interop.hf import hf_incompatibility
from commonlm.interop.importer import import_hf
from commonlm.model.decoder import Decoder
from commonlm.modeldir import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
# dynamic NTK grows beyond max_position_embeddings (32): sequences of 48 use a grown base; the others are scaled
# from an original context of 16 up to 64
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {"max_position_embeddings": 32}),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, {}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0}, {}),
}
CASES = [("llama", "linear"), ("llama", "dynamic"), ("llama", "llama3"), ("llama", "yarn"), ("qwen2", "yarn"),
         ("qwen3", "yarn"), ("mistral", "dynamic"), ("mistral", "llama3")]
CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}


def make_reference(family, scaling, directory, old_style=False):
    rope, extra = SCALINGS[scaling]
    config = getattr(transformers, CLASSES[family])(**{**SMALL, **extra}, rope_parameters={**rope, "rope_theta": 1e4})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    Tokenizer.byte_level().save(directory)
    if old_style:  # as Llama 3.1's and Qwen2.5's own files have it: rope_scaling beside a top-level rope_theta
        cfg = json.loads((directory / "config.json").read_text())
        cfg.pop("rope_parameters")
        cfg.update(rope_theta=1e4, rope_scaling={**rope})
        (directory / "config.json").write_text(json.dumps(cfg))
    return model


def _fresh(directory):
    # transformers' dynamic RoPE keeps state between calls: each comparison gets a model of its own
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("family,scaling", CASES)
def test_import_matches_transformers_logits_and_greedy_tokens(family, scaling, tmp_path):
    make_reference(family, scaling, tmp_path / "hf", old_style=family == "llama")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _, _ = load_model_dir(tmp_path / "ours")
    ours.eval()
    assert ours.config.rope_scaling == scaling
    idx = torch.randint(0, 264, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _fresh(tmp_path / "hf")(idx).logits
        assert (ours(idx)[0] - expected).abs().max().item() < 1e-4
        # the unscaled model would differ: the scaling is really applied
        plain = Decoder(dataclasses.replace(ours.config, rope_scaling="none")).eval()
        plain.load_state_dict(ours.state_dict())
        assert (plain(idx)[0] - expected).abs().max().item() > 1e-3
        # exported back, transformers reads the same model
        back = _fresh(tmp_path / "ours")
        assert type(back).__name__ == f"{family.capitalize()}ForCausalLM"
        assert (back(idx).logits - expected).abs().max().item() < 1e-4

    # greedy decoding with the KV cache, from 28 tokens to 44: for dynamic NTK past its original context of 32
    prompt = idx[:1, :28]
    with torch.no_grad():
        ref_ids = _fresh(tmp_path / "hf").generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate_ids(ours, prompt[0].tolist(), max_tokens=16, temperature=0.0) == ref_ids[0, 28:].tolist()


def test_dynamic_decoding_rotates_each_step_for_its_own_length(tmp_path):
    """transformers' dynamic RoPE under a KV cache: stored keys keep their rotation, each new token gets the
    frequencies of its own length. Step-by-step logits agree with transformers' own cached steps."""
    make_reference("llama", "dynamic", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _, _ = load_model_dir(tmp_path / "ours")
    ours.eval()
    theirs = _fresh(tmp_path / "hf")
    idx = torch.randint(0, 264, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = ours.new_cache(1)
    with torch.no_grad():
        out = theirs(idx[:, :30], use_cache=True)
        assert (ours(idx[:, :30], cache=cache)[0] - out.logits).abs().max().item() < 1e-4
        for t in range(30, 40):  # crossing max_position_embeddings=32
            out = theirs(idx[:, t : t + 1], cache=out.past_key_values, use_cache=True)
            assert (ours(idx[:, t : t + 1], cache=cache)[0] - out.logits).abs().max().item() < 1e-4
        # and this differs from a full forward pass at 40, where every key is rotated for length 40
        full = ours(idx)[0][:, -1]
    assert (full - out.logits[:, -1]).abs().max().item() > 1e-5


@pytest.mark.parametrize("scaling", ["linear", "dynamic", "yarn", "llama3"])
def test_our_scaled_models_export_as_transformers_directories(scaling, tmp_path):
    # scaled from 16 to 32 (dynamic NTK: beyond 16 the base grows, up to 2 x 16)
    extra = {"rope_original_len": 16} if scaling != "linear" else {}
    config = ModelConfig(family="qwen2", n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, vocab_size=264,
                         qkv_bias=True, rope_scaling=scaling, rope_factor=2.0, rope_attention_factor=1.3 if scaling ==
                         "yarn" else 0.0, **extra)
    assert hf_incompatibility(config) is None
    torch.manual_seed(0)
    model = Decoder(config).eval()
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    theirs = _fresh(tmp_path / "m")
    idx = torch.randint(0, 264, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4
    again, _, _ = load_model_dir(tmp_path / "m")
    assert again.config == config


def test_a_dynamic_context_transformers_cannot_state_is_saved_natively():
    # dynamic NTK's context on import is factor x max_position_embeddings: another one does not read back
    config = ModelConfig(family="llama", n_layer=1, n_head=2, d_model=32, max_seq_len=48, vocab_size=264,
                         rope_scaling="dynamic", rope_factor=2.0, rope_original_len=16)
    assert "max_seq_len" in hf_incompatibility(config)


def test_refuses_what_it_cannot_read(tmp_path):
    make_reference("llama", "yarn", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"]["short_factor"] = [1.0]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_scaling.short_factor"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_scaling.high_freq_factor"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("field,value", [("rope_factor", 0.5), ("rope_original_len", -1), ("rope_beta_fast", 0.5),
                                         ("rope_low_freq_factor", 8.0), ("rope_attention_factor", -1.0)])
def test_bad_settings_are_one_line_errors(field, value):
    with pytest.raises(UserError, match=f"model.{field}"):
        ModelConfig(rope_scaling="yarn", **{field: value}).validate()
