"""GGUF for the mixture-of-experts families. Qwen3-MoE: transformers loads our file (its own GGUF reader) and gives our
logits and greedy tokens. DeepSeek-V3 (no GGUF reader in transformers): a DeepseekV3ForCausalLM checkpoint in DeepSeek's
own rotary layout, imported and exported, must come out as llama.cpp's converter would write that checkpoint: every
key from its config, every tensor from its state dict, named and split here by the converter's rules."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from commonlm.config import ModelConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.engine import Engine, Request
from commonlm.interop.hf import to_hf
from commonlm.model.decoder import Decoder

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 2e-2}


def _bpe():
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 20
    return Tokenizer.train_bpe(texts, vocab_size=300)


def _perturbed(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _qwen3_moe(tie=False, **settings):
    # transformers' GGUF reader takes no expert width from the file (Qwen3MoeConfig's default, 768, stands)
    config = ModelConfig(family="qwen3_moe", qk_norm=True, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=32,
                         vocab_size=320, max_seq_len=64, norm_eps=1e-6, tie_embeddings=tie, n_experts=4,
                         experts_per_token=2, expert_ff_dim=768, **settings)
    torch.manual_seed(0)
    return _perturbed(Decoder(config))


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def _dequantized(reader):
    return {t.name: (gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type.name) for t in reader.tensors}


def test_transformers_loads_our_qwen3_moe_gguf_with_our_logits_and_greedy_tokens(tmp_path):
    from commonlm.interop.gguf_export import export_gguf

    model = _qwen3_moe()
    export_gguf(model, _bpe(), tmp_path / "m.gguf", quant="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert type(theirs).__name__ == "Qwen3MoeForCausalLM" and theirs.config.num_experts == 4
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx)[0] - theirs(idx).logits).abs().max().item() <= 1e-4
        want = theirs.generate(idx[:1, :6], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    [ours] = Engine(model, max_batch=1).run_all([Request(prompt_ids=idx[0, :6].tolist(), max_tokens=12,
                                                         temperature=0.0)])
    assert ours.generated == want[0, 6:].tolist()


@pytest.mark.parametrize("quant, tie", [("f32", True), ("f16", False), ("q8_0", False)])
def test_qwen3_moe_gguf_reads_back(quant, tie, tmp_path):
    from commonlm.interop.gguf_export import export_gguf

    model = _qwen3_moe(tie)
    c = model.config
    export_gguf(model, _bpe(), tmp_path / "m.gguf", quant=quant)
    reader, fields = _fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "qwen3moe"
    assert {k: fields[f"qwen3moe.{k}"] for k in ("expert_count", "expert_used_count", "expert_feed_forward_length",
                                                  "attention.head_count_kv", "attention.key_length",
                                                  "rope.dimension_count")} == {
        "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 768, "attention.head_count_kv": 2,
        "attention.key_length": 16, "rope.dimension_count": 16}
    hf = to_hf(c, model.state_dict())
    # llama.cpp's converter: each layer's experts stacked per projection; q/k as they are (NEOX rope, halves)
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"],
                "blk.1.attn_q.weight": hf["model.layers.1.self_attn.q_proj.weight"],
                "blk.1.attn_k_norm.weight": hf["model.layers.1.self_attn.k_norm.weight"],
                "blk.1.ffn_gate_inp.weight": hf["model.layers.1.mlp.gate.weight"]}
    for part, short in [("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")]:
        expected[f"blk.1.ffn_{short}_exps.weight"] = torch.stack(
            [hf[f"model.layers.1.mlp.experts.{e}.{part}.weight"] for e in range(4)])
    got = _dequantized(reader)
    assert ("output.weight" in got) is not tie
    assert len(got) == 3 - tie + 12 * c.n_layer  # embedding, final norm, head; per layer 7 attention, 5 MLP
    for name, want in expected.items():
        tensor, kind = got[name]
        assert tensor.shape == tuple(want.shape), name
        assert np.abs(tensor - want.detach().numpy()).max() <= TOLERANCE[quant] + 1e-7, name
    assert got["blk.1.ffn_gate_inp.weight"][1] == "F32" and got["blk.1.ffn_norm.weight"][1] == "F32"
    if quant == "q8_0":
        assert got["blk.1.ffn_down_exps.weight"][1] == "Q8_0"


def test_qwen3_moe_yarn_is_written_as_llamacpp_reads_it(tmp_path):
    """llama.cpp's cos/sin factor: its own 0.1 ln(factor) + 1 times rope.scaling.attn_factor; it reads no beta keys."""
    from commonlm.interop.gguf_export import export_gguf

    yarn = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_len=16)
    export_gguf(_qwen3_moe(**yarn, rope_attention_factor=1.2), _bpe(), tmp_path / "m.gguf", quant="f16")
    _, fields = _fields(tmp_path / "m.gguf")
    assert {k: v for k, v in fields.items() if k.startswith("qwen3moe.rope.scaling.")} == {
        "qwen3moe.rope.scaling.type": "yarn", "qwen3moe.rope.scaling.factor": 4.0,
        "qwen3moe.rope.scaling.original_context_length": 16,
        "qwen3moe.rope.scaling.attn_factor": pytest.approx(1.2 / (0.1 * np.log(4.0) + 1))}
    with pytest.raises(UserError, match="rope_beta_slow=2.0 with yarn"):
        export_gguf(_qwen3_moe(**yarn, rope_beta_slow=2.0), _bpe(), tmp_path / "x.gguf")


def test_linear_rope_scaling_is_written_as_its_factor(tmp_path):
    from commonlm.interop.gguf_export import export_gguf

    export_gguf(_qwen3_moe(rope_scaling="linear", rope_factor=2.5), _bpe(), tmp_path / "m.gguf", quant="f16")
    _, fields = _fields(tmp_path / "m.gguf")
    assert {k: v for k, v in fields.items() if k.startswith("qwen3moe.rope.scaling.")} == {
        "qwen3moe.rope.scaling.type": "linear", "qwen3moe.rope.scaling.factor": 2.5}


def test_llama3_rope_scaling_is_written_as_llamacpps_frequency_factors(tmp_path):
    """Llama 3.x's scaling as llama.cpp's converter writes it: a rope_freqs tensor, each plain frequency over the
    scaled one, here from transformers' own llama3 frequencies (not ours)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from commonlm.interop.gguf_export import export_gguf

    llama3 = dict(rope_scaling="llama3", rope_factor=8.0, rope_original_len=16, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0)
    model = Decoder(ModelConfig(family="llama", n_layer=1, n_head=4, d_model=64, vocab_size=320, max_seq_len=64,
                                **llama3))
    export_gguf(model, _bpe(), tmp_path / "m.gguf", quant="q8_0")
    reader, fields = _fields(tmp_path / "m.gguf")
    assert not any(k.startswith("llama.rope.scaling.") for k in fields)  # (the factors say it all)
    got, kind = _dequantized(reader)["rope_freqs.weight"]
    theirs = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    scaled = ROPE_INIT_FUNCTIONS["llama3"](theirs, "cpu")[0]
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert kind == "F32" and np.allclose(got, (plain / scaled).numpy(), rtol=1e-6)
    assert got.max() == pytest.approx(8.0) and (got < 7.9).any()  # interpolated by the factor, and blended


# DeepSeek-V3 checkpoints as DeepSeek ships them (rotary pairs interleaved), tiny
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=False, rope_interleave=True, rms_norm_eps=1e-6)
DEEPSEEK = {
    "moe": dict(SMALL, first_k_dense_replace=1, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=2.5,
                norm_topk_prob=True),
    "dense": dict(SMALL, first_k_dense_replace=3, q_lora_rank=None, rope_theta=50000.0),
}
# transformers' DeepseekV3 name -> llama.cpp's DEEPSEEK2 name (convert_hf_to_gguf.py's DeepseekV2Model, read, not run)
LLAMACPP_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight", "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


def _as_llamacpp_writes(hf_config, state):
    """The converter's tensors for a DeepSeek checkpoint: renamed, experts stacked per projection, kv_b split into the
    key part transposed [H, rank, nope] and the value part [H, v, rank]. Rotary rows as they are: DeepSeek's
    interleaved pairs are llama.cpp's."""
    heads, nope, v = hf_config["num_attention_heads"], hf_config["qk_nope_head_dim"], hf_config["v_head_dim"]
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    experts = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            continue
        layer, rest = parts[2], ".".join(parts[3:])
        if rest.startswith("mlp.experts."):  # mlp.experts.E.gate_proj.weight
            experts.setdefault((layer, parts[6]), {})[int(parts[5])] = tensor
        elif rest == "self_attn.kv_b_proj.weight":
            kv = tensor.reshape(heads, nope + v, -1)
            out[f"blk.{layer}.attn_k_b.weight"] = kv[:, :nope].transpose(1, 2)
            out[f"blk.{layer}.attn_v_b.weight"] = kv[:, nope:]
        else:
            out[f"blk.{layer}.{LLAMACPP_NAMES[rest]}"] = tensor
    for (layer, part), by_expert in experts.items():
        short = part.removesuffix("_proj")
        out[f"blk.{layer}.ffn_{short}_exps.weight"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def _deepseek_checkpoint(kind, directory):
    """A random DeepseekV3ForCausalLM saved the transformers way; its weights as the file holds them (one tensor
    per expert and projection, as DeepSeek's checkpoints and the converter's input have them)."""
    torch.manual_seed(0)  # (transformers' initialisation)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**DEEPSEEK[kind]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor non-trivial (norms, router, selection bias), so each one's place matters
        for tensor in model.state_dict().values():  # (the parameters' and buffers' own storage)
            tensor.add_(torch.randn(tensor.shape, generator=g) * 0.05)
    model.save_pretrained(directory)
    Tokenizer.byte_level().save(directory)
    return load_file(directory / "model.safetensors")


@pytest.mark.parametrize("kind, quant", [("moe", "f32"), ("moe", "q8_0"), ("dense", "f16")])
def test_deepseek_v3_gguf_is_what_llamacpps_converter_writes_for_the_checkpoint(kind, quant, tmp_path):
    from commonlm.interop.gguf_export import export_gguf
    from commonlm.interop.importer import import_hf
    from commonlm.modeldir import load_model_dir

    checkpoint = _deepseek_checkpoint(kind, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")  # (import turns the rotary pairs into halves)
    ours, _, _ = load_model_dir(tmp_path / "ours")
    export_gguf(ours, _bpe(), tmp_path / "m.gguf", quant=quant)
    reader, fields = _fields(tmp_path / "m.gguf")
    cfg, moe = DEEPSEEK[kind], kind == "moe"
    assert fields["general.architecture"] == "deepseek2"
    keys = {k.removeprefix("deepseek2."): v for k, v in fields.items() if k.startswith("deepseek2.")}
    lora, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    want = {
        "context_length": 64, "embedding_length": 64, "block_count": 3, "feed_forward_length": 96,
        "attention.head_count": 4, "attention.head_count_kv": 1, "rope.freq_base": cfg.get("rope_theta", 10000.0),
        "attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "vocab_size": 320,
        "leading_dense_block_count": cfg["first_k_dense_replace"], "attention.q_lora_rank": cfg["q_lora_rank"] or 0,
        "attention.kv_lora_rank": lora, "attention.key_length": lora + rope, "attention.value_length": lora,
        "attention.key_length_mla": cfg["qk_nope_head_dim"] + rope, "attention.value_length_mla": cfg["v_head_dim"],
        "rope.dimension_count": rope, "expert_feed_forward_length": cfg["moe_intermediate_size"] if moe else 96,
        "expert_shared_count": cfg["n_shared_experts"] if moe else 0,
    }
    if moe:
        want |= {"expert_count": 8, "expert_used_count": 3, "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
                 "expert_weights_scale": 2.5, "expert_weights_norm": True, "expert_group_count": 4,
                 "expert_group_used_count": 2}
    assert keys == want
    expected = _as_llamacpp_writes(cfg, checkpoint)
    got = _dequantized(reader)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        data, kind_ = got[name]
        assert data.shape == tuple(tensor.shape), name
        assert np.abs(data - tensor.numpy()).max() <= TOLERANCE[quant] + 1e-7, name
        if tensor.dim() == 1 or name.endswith(("ffn_gate_inp.weight", "_norm.weight")):
            assert kind_ == "F32", name


LLAMACPP_LOGITS = """
import json, sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=64, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)
llm.eval(json.loads(sys.argv[2]))
print(json.dumps(llm.scores[: len(json.loads(sys.argv[2]))].tolist()))
"""


# a small DeepSeek-V3 of ours: one dense block, then 8 experts in 4 groups, a shared expert
DEEPSEEK_OURS = dict(family="deepseek_v3", n_layer=3, n_head=4, d_model=64, d_ff=96, vocab_size=320, max_seq_len=64,
                     tie_embeddings=False, norm_eps=1e-6, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=12, n_experts=8, experts_per_token=2, expert_ff_dim=32,
                     n_shared_experts=1, router_score="sigmoid", router_bias=True, router_scale=2.5, expert_groups=4,
                     groups_per_token=2, dense_layers=1)
# YaRN as DeepSeek sets it (mscale = mscale_all_dim: cos/sin unscaled, the softmax scale from mscale_all_dim)
YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_len=16, rope_attention_factor=1.0,
            rope_mscale_all_dim=0.707)


def test_deepseek_v3_yarn_is_written_and_what_llamacpp_would_run_otherwise_is_refused(tmp_path):
    from commonlm.interop.gguf_export import export_gguf

    export_gguf(Decoder(ModelConfig(**DEEPSEEK_OURS, **YARN)), _bpe(), tmp_path / "m.gguf", quant="f16")
    _, fields = _fields(tmp_path / "m.gguf")
    assert {k: v for k, v in fields.items() if k.startswith("deepseek2.rope.scaling.")} == {
        "deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 4.0,
        "deepseek2.rope.scaling.original_context_length": 16,
        "deepseek2.rope.scaling.yarn_log_multiplier": pytest.approx(0.0707)}
    for settings, match in [(YARN | {"rope_attention_factor": 0.0}, "rope_attention_factor=0.0"),
                            (YARN | {"rope_mscale_all_dim": 0.0}, "without model.rope_mscale_all_dim"),
                            (YARN | {"rope_beta_fast": 16.0}, "rope_beta_fast=16.0"),
                            ({"rope_scaling": "linear", "rope_factor": 2.0}, "rope_scaling=linear")]:
        with pytest.raises(UserError, match=match):
            export_gguf(Decoder(ModelConfig(**DEEPSEEK_OURS, **settings)), _bpe(), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(not os.environ.get("LLAMACPP_PYTHON"), reason="set LLAMACPP_PYTHON to a python with llama_cpp")
@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe yarn", "qwen3_moe yarn x1.2", "llama yarn", "llama linear",
                                  "llama llama3", "deepseek_v3", "deepseek_v3 yarn"])
def test_llamacpp_runs_our_file_with_our_logits(kind, tmp_path):
    """Real llama.cpp (llama-cpp-python, in a python of its own) on our f32 file, with an f32 KV cache: its logits at
    every position of a sequence (past YaRN's original context) equal ours within 1e-4."""
    from commonlm.interop.gguf_export import export_gguf

    yarn = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_len=16,
                rope_attention_factor=1.2 if kind.endswith("x1.2") else 0.0) if "yarn" in kind else {}
    if kind.endswith("linear"):
        yarn = dict(rope_scaling="linear", rope_factor=2.5)
    if kind.endswith("llama3"):  # (Llama 3.1's shape of it, the original context short enough to matter here)
        yarn = dict(rope_scaling="llama3", rope_factor=8.0, rope_original_len=16, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0)
    torch.manual_seed(0)
    if kind.startswith("qwen3_moe"):
        model = _qwen3_moe(**yarn)
    elif kind.startswith("llama"):  # (LLAMA rotates interleaved pairs: q/k rows permuted)
        model = _perturbed(Decoder(ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                               vocab_size=320, max_seq_len=64, norm_eps=1e-6, **yarn)))
    else:
        model = _perturbed(Decoder(ModelConfig(**DEEPSEEK_OURS, **(YARN if yarn else {}))))
    export_gguf(model, _bpe(), tmp_path / "m.gguf", quant="f32")
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    (tmp_path / "logits.py").write_text(LLAMACPP_LOGITS)
    command = [os.environ["LLAMACPP_PYTHON"], str(tmp_path / "logits.py"), str(tmp_path / "m.gguf"), json.dumps(ids)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = np.asarray(json.loads(proc.stdout), dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(theirs - ours).max() <= 1e-4
