"""ONNX Runtime and the gguf reader see the same model we trained."""

import numpy as np
import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.hf import to_hf
from commonlm.model.decoder import Decoder

FAMILIES = {
    "llama": ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=320, max_seq_len=48),
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, n_layer=2, n_head=4, n_kv_head=2, head_dim=32, d_model=64,
                         vocab_size=320, max_seq_len=48),
    "gpt2": ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True, n_layer=2,
                        n_head=4, d_model=64, vocab_size=320, max_seq_len=48),
}
LATENT = ModelConfig(family="deepseek_v3", n_layer=2, n_head=4, d_model=64, vocab_size=320, max_seq_len=48,
                     tie_embeddings=False, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=12)  # (ONNX here; GGUF's DEEPSEEK2 layout: tests/interop/test_gguf_moe.py)


def _bpe():
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 20
    return Tokenizer.train_bpe(texts, vocab_size=300)


def _model(kind):
    torch.manual_seed(0)
    model = Decoder(LATENT if kind == "deepseek_v3" else FAMILIES[kind]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "deepseek_v3"])
def test_onnx_matches_pytorch_with_dynamic_batch_and_sequence(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from commonlm.interop.onnx_export import export_onnx

    model = _model(kind)
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for shape in [(1, 1), (2, 7), (3, 48)]:
        idx = torch.randint(0, 320, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = session.run(["logits"], {"input_ids": idx.numpy()})[0]
        with torch.no_grad():
            want = model(idx)[0].numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


def test_onnx_refuses_a_mixture_of_experts_in_one_line(tmp_path):
    from commonlm.interop.onnx_export import export_onnx

    moe = Decoder(ModelConfig(family="qwen3_moe", qk_norm=True, n_layer=1, n_head=2, d_model=32, vocab_size=64,
                              max_seq_len=16, n_experts=4, experts_per_token=2, expert_ff_dim=16))
    with pytest.raises(UserError, match="mixture-of-experts"):
        export_onnx(moe, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _reference_gguf_tensors(model, kind):
    """What llama.cpp expects each tensor to hold, derived independently of the exporter's code path."""
    c = model.config
    hf = to_hf(c, model.state_dict())
    expected = {"token_embd.weight": hf["model.embed_tokens.weight" if kind != "gpt2" else "transformer.wte.weight"]}
    if kind == "llama":
        q = hf["model.layers.0.self_attn.q_proj.weight"]
        d = c.dim_head
        # llama.cpp's LLAMA rope pairs (2i, 2i+1) where HF pairs (i, i + d/2): row i of head h moves to 2i
        order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).reshape(-1)
        expected["blk.0.attn_q.weight"] = q.view(c.n_head, d, -1)[:, order].reshape(q.shape)
    if kind == "gpt2":
        expected["blk.0.attn_qkv.weight"] = model.blocks[0].attn.qkv.weight  # [out, in]
    return expected


@pytest.mark.parametrize("kind", sorted(FAMILIES))
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_reads_back(kind, quant, tmp_path):
    gguf = pytest.importorskip("gguf")
    from commonlm.interop.gguf_export import export_gguf

    model, tok = _model(kind), _bpe()
    export_gguf(model, tok, tmp_path / "m.gguf", quant=quant)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == {"llama": "llama", "qwen3": "qwen3", "gpt2": "gpt2"}[kind]
    assert int(fields[f"{arch}.block_count"].parts[-1][0]) == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size  # padded past the tokenizer
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tok.eot_id
    tensors = {t.name: t for t in reader.tensors}
    n_expected = len(to_hf(model.config, model.state_dict()))
    assert len(tensors) == n_expected
    tolerance = {"f32": 0.0, "f16": 1e-3, "q8_0": 2e-2}[quant]
    for name, want in _reference_gguf_tensors(model, kind).items():
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.abs(got - want.detach().numpy()).max() <= tolerance + 1e-7, name
    if quant == "q8_0":
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"


def test_gguf_refuses_a_native_architecture(tmp_path):
    pytest.importorskip("gguf")
    from commonlm.interop.gguf_export import export_gguf

    model = Decoder(ModelConfig(family="llama", pos_emb="learned", n_layer=1, n_head=2, d_model=32, vocab_size=320))
    with pytest.raises(UserError, match="pos_emb"):
        export_gguf(model, _bpe(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(UserError, match="needs merges"):
        export_gguf(_model("llama"), Tokenizer.byte_level(), tmp_path / "m.gguf")
    # settings a transformers directory holds but this GGUF writer does not: llama.cpp would run them wrong
    for setting, match in [({"family": "qwen3", "qk_norm": True, "rope_scaling": "llama3", "rope_factor": 8.0},
                            "rope_scaling"),
                           ({"sliding_window": 16}, "sliding_window"),
                           ({"family": "qwen3_moe", "qk_norm": True, "n_experts": 4, "experts_per_token": 2,
                             "router_norm_topk": False}, "router_norm_topk")]:
        config = ModelConfig(**{"family": "llama", "n_layer": 1, "n_head": 2, "d_model": 32, "vocab_size": 320,
                                **setting})
        with pytest.raises(UserError, match=match):
            export_gguf(Decoder(config), _bpe(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_export_replaces_a_file_atomically_and_leaves_no_temp_files(fmt, tmp_path):
    """Exporting onto a directory crashed after the work and left `.NAME.tmp` behind."""
    pytest.importorskip({"onnx": "onnxscript", "gguf": "gguf"}[fmt])
    from commonlm.interop.gguf_export import export_gguf
    from commonlm.interop.onnx_export import export_onnx

    model, tok = _model("llama"), _bpe()
    export = (lambda out: export_onnx(model, out)) if fmt == "onnx" else (lambda out: export_gguf(model, tok, out))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        export(tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and not any((tmp_path / "taken").iterdir())
    (tmp_path / f"m.{fmt}").write_text("old")
    export(tmp_path / f"m.{fmt}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.{fmt}", "taken"]
    assert (tmp_path / f"m.{fmt}").stat().st_size > 1000
