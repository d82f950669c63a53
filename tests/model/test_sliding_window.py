"""Sliding-window attention (Mistral; Qwen2's full layers first) gives transformers' logits past the window, in a
full forward pass and step by step through every KV cache, and imports and exports both ways."""

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
from commonlm.model.kv_cache import PackedRows, SlotKVCache, StaticKVCache
from commonlm.modeldir import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
REFERENCES = {
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=8),
    # layer 0 attends fully, layers 1 and 2 within the window
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1),
}
WINDOW, T = 8, 40


def imported(kind, tmp_path):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(REFERENCES[kind]()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "hf")
    Tokenizer.byte_level().save(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _, _ = load_model_dir(tmp_path / "ours")
    return ref, ours.eval()


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_import_matches_transformers_beyond_the_window_and_exports_back(kind, tmp_path):
    ref, ours = imported(kind, tmp_path)
    assert ours.config.sliding_window == WINDOW
    assert ours.config.full_attention_layers == (1 if kind == "qwen2" else 0)
    idx = torch.randint(0, 264, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(idx).logits
        assert (ours(idx)[0] - expected).abs().max().item() < 1e-4
        whole = Decoder(dataclasses.replace(ours.config, sliding_window=0)).eval()
        whole.load_state_dict(ours.state_dict())
        assert (whole(idx)[0] - expected).abs().max().item() > 1e-3  # the window really narrows attention
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(back) is type(ref)
        assert (back(idx).logits - expected).abs().max().item() < 1e-4
    prompt = idx[:1, :12]
    with torch.no_grad():
        ref_ids = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert generate_ids(ours, prompt[0].tolist(), max_tokens=20, temperature=0.0) == ref_ids[0, 12:].tolist()


@pytest.mark.parametrize("kind", [None, SlotKVCache, StaticKVCache])
def test_prefill_and_step_by_step_decoding_match_transformers(kind, tmp_path):
    ref, ours = imported("qwen2", tmp_path)
    idx = torch.randint(0, 264, (1, T), generator=torch.Generator().manual_seed(2))
    cache = ours.new_cache(1) if kind is None else ours.new_cache(1, kind=kind)
    with torch.no_grad():
        expected = ref(idx).logits
        got = [ours(idx[:, :13], cache=cache)[0]]  # a prefill longer than the window
        got += [ours(idx[:, t : t + 1], cache=cache)[0] for t in range(13, 30)]
        got.append(ours(idx[:, 30:], cache=cache)[0])  # a chunk after earlier keys
    assert (torch.cat(got, dim=1) - expected).abs().max().item() < 1e-4


def test_packed_rows_keep_the_window_within_each_sequence(tmp_path):
    _, ours = imported("mistral", tmp_path)
    a, b = torch.randint(0, 264, (1, 14)), torch.randint(0, 264, (1, 20))
    segments = torch.tensor([[0] * 14 + [1] * 20])
    with torch.no_grad():
        packed = ours(torch.cat([a, b], dim=1), cache=PackedRows(segments))[0]
        assert (packed[:, :14] - ours(a)[0]).abs().max().item() < 1e-5
        assert (packed[:, 14:] - ours(b)[0]).abs().max().item() < 1e-5


def test_what_a_family_cannot_state_is_saved_natively(tmp_path):
    small = dict(n_layer=2, n_head=2, d_model=32, vocab_size=264, max_seq_len=32)
    assert "sliding_window" in hf_incompatibility(ModelConfig(family="llama", sliding_window=8, **small))
    assert "full_attention_layers" in hf_incompatibility(
        ModelConfig(family="mistral", sliding_window=8, full_attention_layers=1, **small))
    config = ModelConfig(family="qwen3", qk_norm=True, sliding_window=8, full_attention_layers=1, **small)
    assert hf_incompatibility(config) is None
    model = Decoder(config).eval()
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 264, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4


def test_refuses_layer_patterns_it_cannot_state(tmp_path):
    imported("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="layer_types"):
        import_hf(tmp_path / "hf", tmp_path / "other")
    with pytest.raises(UserError, match="model.full_attention_layers"):
        ModelConfig(n_layer=2, sliding_window=4, full_attention_layers=2).validate()
