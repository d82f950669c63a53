"""Our model directories load in transformers unchanged, with the same logits and greedy tokens."""

import pytest
import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.interop.hf import hf_incompatibility
from commonlm.model.decoder import Decoder
from commonlm.modeldir import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "gpt2": ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                        n_layer=2, n_head=4, d_model=64, max_seq_len=32, vocab_size=264),
    "gpt2-untied-exact-gelu": ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                                          tie_embeddings=False, n_layer=2, n_head=4, d_model=64, max_seq_len=32,
                                          vocab_size=264),
    "llama-gqa": ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32,
                             vocab_size=264, tie_embeddings=False, rope_theta=500000.0),
    "llama-bias": ModelConfig(family="llama", n_layer=2, n_head=4, d_model=64, max_seq_len=32, vocab_size=264,
                              bias=True),
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, n_layer=2, n_head=4, n_kv_head=2, head_dim=32, d_model=64,
                         max_seq_len=32, vocab_size=264, norm_eps=1e-6, rope_theta=1e6),
}


def _randomize(model: Decoder) -> None:
    # Non-trivial norms and biases so a mapping mistake in any tensor shows up in the logits.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_transformers_loads_our_directory_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    config = FAMILIES[name]
    assert hf_incompatibility(config) is None
    model = Decoder(config).eval()
    _randomize(model)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = theirs(idx).logits
    assert (ours - ref).abs().max().item() < 1e-4

    # greedy generation agrees token for token
    prompt = idx[:1, :5]
    with torch.no_grad():
        ref_ids = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    from commonlm.infer.generate import generate_ids

    our_ids = generate_ids(model, prompt[0].tolist(), max_tokens=12, temperature=0.0)
    assert our_ids == ref_ids[0, 5:].tolist()

    # and our loader reads back the identical model
    again, _, _ = load_model_dir(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again.eval()(idx)[0], ours)


def test_configuration_without_hf_class_is_saved_natively(tmp_path):
    config = ModelConfig(family="llama", pos_emb="learned", n_layer=1, n_head=2, d_model=32, vocab_size=264)
    assert "pos_emb" in hf_incompatibility(config)
    model = Decoder(config)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "commonlm" and "not loadable by transformers" in cfg["commonlm_note"]
    again, _, _ = load_model_dir(tmp_path / "m")
    idx = torch.randint(0, 264, (1, 8))
    assert torch.equal(again(idx)[0], model(idx)[0])


def test_large_models_are_saved_in_shards_that_both_sides_load(tmp_path, monkeypatch):
    import commonlm.modeldir as modeldir

    monkeypatch.setattr(modeldir, "SHARD_BYTES", 40_000)  # force several shards for a tiny model
    config = FAMILIES["llama-gqa"]
    model = Decoder(config).eval()
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "m" / "model.safetensors").exists()
    idx = torch.randint(0, config.vocab_size, (1, 9))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    again, _, _ = load_model_dir(tmp_path / "m")
    with torch.no_grad():
        ours = model(idx)[0]
        assert torch.equal(again(idx)[0], ours)
        assert (theirs(idx).logits - ours).abs().max().item() < 1e-4
