"""Mixture of experts (model/moe.py): dense equivalence, exact dropless dispatch, load balancing, Qwen3-MoE parity
both ways, training through the loop with exact resume, and KV-cached generation."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.generate import generate_ids
from commonlm.interop.hf import from_hf, hf_incompatibility, model_config_from_hf
from commonlm.interop.importer import import_hf
from commonlm.model.decoder import Decoder, SwiGLU
from commonlm.model.moe import MoE, grouped_mm
from commonlm.modeldir import load_model_dir, save_model_dir
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from tests.train.test_trainer import small_config, train_losses

QWEN3_MOE = ModelConfig(family="qwen3_moe", qk_norm=True, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=64,
                        max_seq_len=32, vocab_size=264, norm_eps=1e-6, rope_theta=1e6, tie_embeddings=False,
                        n_experts=8, experts_per_token=2, expert_ff_dim=32)


def _moe(**fields) -> MoE:
    """A mixture-of-experts MLP, initialised as the decoder initialises it (router and shared experts too)."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**{"d_model": 32, "n_experts": 4, "experts_per_token": 2, "expert_ff_dim": 24, **fields}))
    moe.reset_parameters()
    with torch.no_grad():
        for linear in (m for m in moe.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.normal_(0, 0.02)
    return moe


def test_one_expert_is_the_dense_mlp_with_its_weights():
    config = ModelConfig(d_model=32, d_ff=48, n_experts=1, experts_per_token=1)
    moe, dense = MoE(config), SwiGLU(config)
    moe.reset_parameters()
    with torch.no_grad():
        dense.gate_up.weight.copy_(moe.experts.gate_up_proj[0])
        dense.proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    y, aux = moe(x)
    assert aux == {}
    assert torch.allclose(y, dense(x), atol=1e-6)


@pytest.mark.parametrize("fields", [{}, {"router_score": "sigmoid", "router_norm_topk": False},
                                    {"n_shared_experts": 1, "expert_ff_dim": 7}])  # (7: unaligned, the expert loop)
def test_dispatch_is_each_tokens_weighted_sum_of_its_chosen_experts(fields):
    moe = _moe(**fields)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    y, _ = moe(x[None])
    chosen, weights, _ = moe.route(x)
    assert chosen.shape == (50, 2) and (chosen[:, 0] != chosen[:, 1]).all()
    for t in range(50):  # one token at a time, one expert at a time
        expected = moe.shared(x[t]) if moe.shared is not None else torch.zeros(32)
        for e, w in zip(chosen[t].tolist(), weights[t]):
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            expected = expected + w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
        assert torch.allclose(y[0, t], expected, atol=1e-5), t
    assert moe.stats["load"].sum().item() == pytest.approx(1.0) and moe.stats["dropped"].item() == 0


def test_grouped_kernel_and_expert_loop_agree_with_gradients():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(40, 16, generator=g, requires_grad=True), torch.randn(3, 32, 16, generator=g)
    weight.requires_grad_()
    counts = torch.tensor([5, 0, 35])
    y = grouped_mm(x, weight, counts)  # 16 and 32 fp32 columns: the grouped kernel on CPU
    reference = grouped_mm(x, weight, counts, kernel=False)  # the loop over experts
    assert torch.allclose(y, reference, atol=1e-5)
    assert torch.allclose(reference, torch.cat([x[:5] @ weight[0].t(), x[5:] @ weight[2].t()]), atol=1e-5)
    grad = torch.randn(40, 32, generator=g)
    dx, dw = torch.autograd.grad(y, (x, weight), grad)
    rx, rw = torch.autograd.grad(reference, (x, weight), grad)
    assert torch.allclose(dx, rx, atol=1e-5) and torch.allclose(dw, rw, atol=1e-4) and dw[1].abs().max() == 0


def _loads_under_skew(score: str, balance_rate: float, steps: int = 300) -> torch.Tensor:
    """Per-step load [steps, 8] of a router that favours experts 0 and 1, over fresh batches whose tokens share a
    common direction (as hidden states do), in training mode."""
    moe = _moe(n_experts=8, router_score=score, balance_rate=balance_rate)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1, generator=g)
        moe.router.weight[:2] += 0.05
    moe.train()
    loads = []
    with torch.no_grad():
        for _ in range(steps):
            moe(torch.randn(128, 32, generator=g) + 1.0)
            loads.append(moe.stats["load"])
    return torch.stack(loads)


@pytest.mark.parametrize("score, rate", [("softmax", 1e-3), ("sigmoid", 3e-3)])
def test_balancing_bias_moves_a_skewed_load_toward_uniform(score, rate):
    def worst(loads: torch.Tensor) -> float:  # the largest distance of an expert's load from 1/8, per step
        return (loads - 1 / 8).abs().amax(-1).mean().item()

    balanced, unbalanced = _loads_under_skew(score, rate), _loads_under_skew(score, 0.0)
    assert worst(balanced[:5]) > 0.25 and worst(unbalanced[-20:]) > 0.25  # skewed, and stays so without the bias
    assert worst(balanced[-20:]) < 0.06
    assert balanced[-20:].mean(0).min() > 0.09  # experts that started with (nearly) no tokens now get their share


def test_the_bias_chooses_but_does_not_weigh_and_moves_only_in_training():
    moe = _moe(balance_rate=0.01)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    moe.train()
    with torch.no_grad():
        for _ in range(5):
            moe(x)
    assert moe.balance_bias.abs().sum() > 0
    chosen, weights, scores = moe.route(x)
    assert torch.allclose(weights, scores.gather(-1, chosen) / scores.gather(-1, chosen).sum(-1, keepdim=True))
    moe.eval()
    bias = moe.balance_bias.clone()
    moe(x)
    assert torch.equal(bias, moe.balance_bias)


def test_aux_loss_reaches_the_gradient_of_the_router():
    moe = _moe(router_aux_loss=0.01).train()
    y, aux = moe(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5)))
    assert set(aux) == {"router_aux_loss"} and aux["router_aux_loss"].item() > 0
    aux["router_aux_loss"].backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_flops_count_active_experts_only():
    dense = Decoder(ModelConfig(vocab_size=64, d_model=64, n_head=4, d_ff=64))
    moe = Decoder(ModelConfig(vocab_size=64, d_model=64, n_head=4, n_experts=16, experts_per_token=2, expert_ff_dim=32))
    router = 4 * 64 * 16  # the router is a matmul every token runs, in each of the 4 layers
    assert moe.flops_per_token(32) == dense.flops_per_token(32) + 6 * router
    assert moe.num_params() > 4 * dense.num_params() // 2  # while it holds 16 experts' weights


def test_config_checks_name_the_key():
    with pytest.raises(UserError, match="model.experts_per_token"):
        ModelConfig(n_experts=4, experts_per_token=5).validate()
    with pytest.raises(UserError, match="model.mlp"):
        ModelConfig(n_experts=4, mlp="gelu").validate()
    with pytest.raises(UserError, match="model.n_experts"):
        ModelConfig(family="qwen3_moe").validate()


def _randomize(model: Decoder) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_transformers_qwen3_moe_loads_our_directory_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    assert hf_incompatibility(QWEN3_MOE) is None
    model = Decoder(QWEN3_MOE).eval()
    _randomize(model)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=QWEN3_MOE))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in load_file(str(tmp_path / "m" / "model.safetensors"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 264, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4
        ref_ids = theirs.generate(idx[:1, :5], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate_ids(model, idx[0, :5].tolist(), max_tokens=12, temperature=0.0) == ref_ids[0, 5:].tolist()


def test_a_qwen3_moe_directory_of_transformers_imports_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    theirs = transformers.Qwen3MoeForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    Tokenizer.byte_level().save(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf", tmp_path / "ours")
    config = model_config_from_hf(json.loads((ours / "config.json").read_text()))
    assert config.n_experts == 8 and config.router_norm_topk and config.family == "qwen3_moe"
    model = Decoder(config)
    model.load_state_dict(from_hf(config, load_file(str(ours / "model.safetensors")), model.state_dict()))
    idx = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.eval()(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4


def test_our_loader_reads_a_qwen3_moe_directory(tmp_path):
    model = Decoder(QWEN3_MOE).eval()
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=QWEN3_MOE))
    again, _, _ = load_model_dir(tmp_path / "m")
    idx = torch.randint(0, 264, (1, 8))
    assert torch.equal(again.eval()(idx)[0], model(idx)[0])


@pytest.mark.parametrize("fields", [{"n_shared_experts": 1}, {"router_score": "sigmoid"}, {"balance_rate": 1e-3}])
def test_what_qwen3_moe_cannot_express_is_saved_natively(fields, tmp_path):
    config = ModelConfig(**{**QWEN3_MOE.__dict__, **fields})
    assert hf_incompatibility(config) is not None
    model = Decoder(config)
    save_model_dir(tmp_path / "m", model, Tokenizer.byte_level(), RunConfig(model=config))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "commonlm"
    again, _, _ = load_model_dir(tmp_path / "m")
    idx = torch.randint(0, 264, (1, 8))
    assert torch.equal(again.eval()(idx)[0], model.eval()(idx)[0])


MOE_RUN = ["model.n_experts=4", "model.experts_per_token=2", "model.expert_ff_dim=64", "model.balance_rate=1e-3",
           "model.router_aux_loss=0.01", "train.lr=3e-3"]


def test_a_tiny_moe_trains_and_resumes_exactly(byte_data, tmp_path):
    steps = [*MOE_RUN, "train.max_steps=12", "train.ckpt_every=4"]
    full = train(small_config(byte_data, *steps), tmp_path / "full")
    losses = train_losses(tmp_path / "full")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert all(r["router_aux_loss"] > 0 for r in read_metrics(tmp_path / "full") if "loss" in r)
    train(small_config(byte_data, *steps), tmp_path / "part", stop_at_step=6)
    resumed = train(small_config(byte_data, *steps), tmp_path / "part", resume=True)
    assert train_losses(tmp_path / "part") == losses
    a, b = load_file(str(full.final_dir / "model.safetensors")), load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["blocks.0.mlp.balance_bias"].abs().sum() > 0  # the balancing bias moved, and was carried across


def test_kv_cached_generation_equals_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, max_seq_len=64, n_experts=4,
                                n_shared_experts=1, expert_ff_dim=16)).eval()
    _randomize(model)
    prompt = [3, 1, 4, 1, 5]
    cached = generate_ids(model, prompt, max_tokens=10, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_a_moe_built_on_meta_and_initialised_there_equals_one_built_on_the_host():
    from commonlm.train.parallel import init_weights

    config = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_experts=4, n_shared_experts=1,
                         balance_rate=1e-3)
    torch.manual_seed(7)
    host = Decoder(config)
    with torch.device("meta"):
        meta = Decoder(config)
    torch.manual_seed(7)
    init_weights(meta, 7, torch.device("cpu"))
    a, b = host.state_dict(), meta.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["blocks.1.mlp.experts.down_proj"].std() > 0


def test_activation_checkpointing_recomputes_the_same_routing():
    config = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_experts=4, balance_rate=0.05)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Decoder(config).train()
        model.activation_checkpointing = checkpointing
        for _ in range(3):  # the bias moves between forwards, never between a forward and its recomputation
            model.zero_grad()
            logits, _ = model(idx)
            logits.float().logsumexp(-1).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        assert model.blocks[0].mlp.balance_bias.abs().sum() > 0
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
