"""LoRA adapters: exact merge, no-op start, only the adapter trains, and PEFT loads what we save."""

import copy

import pytest
import torch
import torch.nn.functional as F

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder
from commonlm.modeldir import save_model_dir
from commonlm.tune.lora import LLAMA_TARGETS, LoRALinear, add_lora, lora_modules, merge_lora, save_adapter

LLAMA = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, vocab_size=264,
                    tie_embeddings=False)
GPT2 = ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True, n_layer=2,
                   n_head=4, d_model=64, max_seq_len=32, vocab_size=264)


def _model(config: ModelConfig = LLAMA) -> Decoder:
    torch.manual_seed(0)
    return Decoder(config).eval()


def _randomize_b(model: Decoder) -> None:
    # B starts at zero (a no-op adapter); give it values so the adapter shows in logits and merges
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _idx(config: ModelConfig = LLAMA) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def test_fresh_adapter_keeps_base_logits_and_freezes_base():
    model = _model()
    with torch.no_grad():
        ref, _ = model(_idx())
    add_lora(model, r=4, alpha=8, targets=LLAMA_TARGETS)
    with torch.no_grad():
        ours, _ = model(_idx())
    assert torch.equal(ours, ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and set(qkv.lora_B) == {"q_proj", "k_proj", "v_proj"}
    assert qkv.lora_B["q_proj"].shape == (64, 4) and qkv.lora_B["k_proj"].shape == (32, 4)


def test_merge_equals_base_plus_scaled_ba():
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    _randomize_b(model)
    qkv = model.blocks[1].attn.qkv
    a_q, b_q = qkv.lora_A["q_proj"].detach().clone(), qkv.lora_B["q_proj"].detach().clone()
    a_v, b_v = qkv.lora_A["v_proj"].detach().clone(), qkv.lora_B["v_proj"].detach().clone()
    with torch.no_grad():
        adapted, _ = model(_idx())
    merge_lora(model)
    assert not lora_modules(model) and set(model.state_dict()) == set(base)
    w, w0 = model.blocks[1].attn.qkv.weight, base["blocks.1.attn.qkv.weight"]
    assert torch.allclose(w[:64], w0[:64] + 2.0 * b_q @ a_q, atol=1e-6)
    assert torch.equal(w[64:96], w0[64:96])  # k rows: not a target
    assert torch.allclose(w[96:], w0[96:] + 2.0 * b_v @ a_v, atol=1e-6)
    assert torch.equal(model.blocks[1].mlp.gate_up.weight, base["blocks.1.mlp.gate_up.weight"])
    with torch.no_grad():
        merged, _ = model(_idx())
    assert (merged - adapted).abs().max().item() < 1e-5


def test_training_changes_only_the_adapter():
    model = _model().train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, r=4, alpha=8, dropout=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    idx = _idx()
    losses = []
    for _ in range(5):
        logits, _ = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the base tensors live on inside the adapter modules (".base."): every one unchanged, none left out
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert set(after) == set(base)
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    assert any(b.abs().sum() > 0 for m in lora_modules(model).values() for b in m.lora_B.values())


def test_unknown_target_is_refused():
    with pytest.raises(UserError, match="c_attn"):
        add_lora(_model(), r=4, alpha=8, targets=["c_attn"])


@pytest.mark.parametrize("config,targets", [(LLAMA, list(LLAMA_TARGETS)), (GPT2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2"])
def test_peft_loads_our_adapter_with_same_logits(config, targets, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _model(config)
    save_model_dir(tmp_path / "base", model, Tokenizer.byte_level(), RunConfig(model=config))
    with torch.no_grad():
        base_logits, _ = model(_idx(config))
    add_lora(model, r=4, alpha=8, targets=targets)
    _randomize_b(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    idx = _idx(config)
    with torch.no_grad():
        ours, _ = model(idx)
        ref = theirs(idx).logits
        plain, _ = copy.deepcopy(model).eval()(idx)
    assert (ours - base_logits).abs().max().item() > 1e-3  # the adapter matters, so PEFT must have applied it
    assert (ours - ref).abs().max().item() < 1e-4
    assert (merge_lora(model)(idx)[0] - plain).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_gradients_equal_those_through_the_dequantized_float_base(mode):
    from torch import nn

    from commonlm.tune.lora import quantize_base

    model = quantize_base(_model().train(), mode)
    add_lora(model, r=4, alpha=8)
    _randomize_b(model)
    # the same model with each quantized base replaced by a float nn.Linear holding its dequantized weight
    reference = copy.deepcopy(model)
    for m in lora_modules(reference).values():
        linear = nn.Linear(m.in_features, m.out_features, bias=False)
        linear.weight = nn.Parameter(m.base.dequantized(), requires_grad=False)
        m.base = linear
    idx = _idx()
    grads = []
    for m in (model, reference):
        logits, _ = m(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 2 * 2 * 7
    for name, grad in grads[1].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grads[0][name], grad, rtol=1e-3, atol=1e-6), name


def test_flops_count_no_weight_gradient_for_the_frozen_base():
    """MFU of a LoRA run: a frozen matmul costs 4 FLOPs per weight (forward, input gradient), an adapter 6."""
    model = _model()
    c = model.config
    attention = 12 * c.n_layer * c.n_head * c.dim_head * 16
    full = model.flops_per_token(16)
    matmul = (full - attention) // 6
    add_lora(model, 4, 8.0)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters > 0 and model.flops_per_token(16) == 4 * matmul + 6 * adapters + attention
