"""DeepSeek-V3 (latent attention, group-routed experts) both ways against transformers' DeepseekV3ForCausalLM, built
from tiny random configs: import HF -> ours, export ours -> HF, logits within 1e-4 and the same greedy tokens."""

import json

import pytest
import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.engine import Engine, Request
from commonlm.interop.hf import hf_incompatibility
from commonlm.interop.importer import import_hf
from commonlm.model.decoder import Decoder
from commonlm.modeldir import load_model_dir, save_model_dir, write_model_files

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=12, tie_word_embeddings=False)
REFERENCES = {
    # every layer dense (first_k_dense_replace = layers), queries from one projection, interleaved rotary pairs
    "dense": dict(SMALL, first_k_dense_replace=3, q_lora_rank=None, rope_interleave=True),
    # one dense layer then experts: 8 in 4 groups, a token picks 3 from its 2 best groups; queries through a latent
    "moe": dict(SMALL, first_k_dense_replace=1, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=2.5,
                norm_topk_prob=True, rope_interleave=True),
    # yarn with DeepSeek's mscale (the softmax scale and the cos/sin factor), rotary pairs in halves
    "yarn": dict(SMALL, first_k_dense_replace=3, q_lora_rank=24, rope_interleave=False,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                  "beta_slow": 1.0}),
}


def make_reference(kind, directory):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**REFERENCES[kind])).eval()
    with torch.no_grad():  # non-trivial norms, router and selection bias, so every tensor's mapping matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    model.save_pretrained(directory)
    Tokenizer.byte_level().save(directory)
    return model


def _idx():
    return torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(1))


def _greedy_via_engine(model, prompt, n):
    engine = Engine(model, max_batch=2)
    [result] = engine.run_all([Request(prompt_ids=prompt, max_tokens=n, temperature=0.0)])
    return result.generated


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_import_is_exact_and_exports_back(kind, tmp_path):
    ref = make_reference(kind, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _, config = load_model_dir(tmp_path / "ours")
    ours.eval()
    assert config.model.family == "deepseek_v3" and config.model.kv_lora_rank == 16
    assert (config.model.n_experts, config.model.dense_layers) == ((8, 1) if kind == "moe" else (0, 0))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "deepseek_v3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()  # and exported back out
    assert type(back) is type(ref)
    idx = _idx()
    with torch.no_grad():
        expected, ref_ids = ref(idx).logits, ref.generate(idx[:1, :6], max_new_tokens=10, do_sample=False,
                                                          eos_token_id=None, pad_token_id=0)
        for logits in (ours(idx)[0], back(idx).logits):
            assert (logits - expected).abs().max().item() < 1e-4
    assert _greedy_via_engine(ours, idx[0, :6].tolist(), 10) == ref_ids[0, 6:].tolist()


def _ours(**overrides):
    config = ModelConfig(family="deepseek_v3", n_layer=3, n_head=4, d_model=64, d_ff=96, vocab_size=264,
                         max_seq_len=64, tie_embeddings=False, norm_eps=1e-6, kv_lora_rank=16, q_lora_rank=24,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, **overrides)
    torch.manual_seed(0)
    model = Decoder(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("balance_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return config, model


OURS = {
    "dense": {},
    "moe": dict(n_experts=8, experts_per_token=2, expert_ff_dim=32, n_shared_experts=2, router_score="sigmoid",
                router_bias=True, router_scale=1.5, expert_groups=2, groups_per_token=1, dense_layers=1),
}


BALANCING = OURS["moe"] | {"balance_rate": 1e-3}  # trained with auxiliary-loss-free balancing


@pytest.mark.parametrize("kind", [*sorted(OURS), "balancing"])
def test_transformers_loads_our_directory_with_same_logits(kind, tmp_path):
    config, model = _ours(**OURS.get(kind, BALANCING))
    if kind == "balancing":  # the rate has no DeepSeek-V3 field (nor its pending load a name): a model directory
        assert "balance_rate=" in hf_incompatibility(config)  # leaves them out (modeldir.inference_form)
        model.train()(_idx())  # a training forward: a pending load to leave out
        model.eval()
    else:
        assert hf_incompatibility(config, model.state_dict()) is None
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    idx = _idx()
    with torch.no_grad():
        ours = model(idx)[0]
        assert (ours - theirs(idx).logits).abs().max().item() < 1e-4
        ref_ids = theirs.generate(idx[:1, :5], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert _greedy_via_engine(model, idx[0, :5].tolist(), 10) == ref_ids[0, 5:].tolist()
    again, _, saved = load_model_dir(tmp_path / "m")
    assert saved.model.balance_rate == 0.0
    with torch.no_grad():
        assert torch.equal(again.eval()(idx)[0], ours)


@pytest.mark.parametrize("fields", [
    {"router_aux_loss": 0.01}, {"n_shared_experts": 0}, {"router_score": "softmax"}, {"sliding_window": 8},
    {"router_bias": False},
])
def test_what_the_class_cannot_hold_is_saved_natively(fields, tmp_path):
    config, model = _ours(**OURS["moe"] | fields)
    assert f"{next(iter(fields))}=" in hf_incompatibility(config)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "commonlm"


def test_a_checkpoint_of_a_model_trained_with_balancing_keeps_the_rate_and_its_pending_load(tmp_path):
    """What a model directory leaves out (the test above), a checkpoint keeps, to resume exactly."""
    config, model = _ours(**BALANCING)
    model.train()(_idx())
    assert any(b.abs().sum() > 0 for n, b in model.named_buffers() if n.endswith("balance_load"))
    write_model_files(tmp_path, model, Tokenizer.byte_level(), RunConfig(model=config))  # as a checkpoint is written
    resumed, _, saved = load_model_dir(tmp_path)
    assert saved.model.balance_rate == 1e-3
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "commonlm"
    assert all(torch.equal(b, dict(resumed.named_buffers())[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize("field, value, match", [
    ("attention_bias", True, "attention_bias=True"),
    ("n_shared_experts", 0, "n_shared_experts=0"),
    ("rope_parameters", {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}, "rope_type='longrope'"),
])
def test_import_refuses_what_it_cannot_represent(field, value, match, tmp_path):
    make_reference("moe", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(UserError, match=match):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_multi_token_prediction_layers_are_left_out(tmp_path, capsys):
    ref = make_reference("dense", tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.3.enorm.weight"] = torch.ones(64)  # an MTP layer after the last of 3 layers
    weights["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    import_hf(tmp_path / "hf", tmp_path / "ours")
    said = " ".join(capsys.readouterr().err.split())  # (the console writes to stderr, wrapped)
    assert "left out 1 multi-token-prediction layer(s) (2 tensors)" in said
    ours, _, _ = load_model_dir(tmp_path / "ours")
    with torch.no_grad():
        assert (ours.eval()(_idx())[0] - ref(_idx()).logits).abs().max().item() < 1e-4


# DeepSeek-V3's own config.json (its published field values; the remote-code keys transformers ignores included)
V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
      "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
      "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
      "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
      "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
      "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
      "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
      "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
      "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128,
      "vocab_size": 129280, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                             "type": "yarn"}}


def test_deepseek_v3s_own_config_reads_exactly_and_its_fp8_release_is_refused():
    from commonlm.interop.hf import hf_config, model_config_from_hf

    c = model_config_from_hf(V3)
    assert (c.n_layer, c.n_head, c.kv_lora_rank, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim) == (
        61, 128, 512, 1536, 128, 64)
    assert (c.n_experts, c.experts_per_token, c.expert_groups, c.groups_per_token, c.dense_layers) == (256, 8, 8, 4, 3)
    assert c.router_bias and c.router_scale == 2.5 and c.router_score == "sigmoid"
    assert (c.rope_scaling, c.rope_factor, c.rope_original_len, c.max_seq_len) == ("yarn", 40, 4096, 163840)
    assert c.rope_attention_factor == 1.0 and c.rope_mscale_all_dim == 1.0  # mscale / mscale_all_dim; the softmax's
    assert hf_incompatibility(c) is None
    assert model_config_from_hf(hf_config(c)) == c
    # a key left out reads as DeepseekV3Config's default, as transformers reads it
    bare = model_config_from_hf({"model_type": "deepseek_v3"})
    theirs = transformers.DeepseekV3Config()
    assert (bare.max_seq_len, bare.q_lora_rank, bare.dense_layers, bare.expert_groups, bare.router_scale) == (
        theirs.max_position_embeddings, theirs.q_lora_rank, theirs.first_k_dense_replace, theirs.n_group,
        theirs.routed_scaling_factor)
    with pytest.raises(UserError, match="quantization_config.quant_method='fp8'"):
        model_config_from_hf({**V3, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    with pytest.raises(UserError, match="scoring_func='softmax'"):
        model_config_from_hf({**V3, "scoring_func": "softmax"})
