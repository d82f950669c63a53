"""The decoder: causality, KV-cache decoding, loss, activation checkpointing, tying, init and accounting."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from commonlm.config import ModelConfig
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import KVCache, StaticKVCache
from commonlm.model.loss import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


V = 61  # deliberately not a multiple of 64

FAMILIES = {
    # GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings
    "gpt2": ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                        n_layer=2, n_head=4, d_model=32, max_seq_len=24, vocab_size=V),
    # GPT-2 layout with untied embeddings and exact GELU
    "gpt2-untied": ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                               tie_embeddings=False, n_layer=2, n_head=4, d_model=32, max_seq_len=24, vocab_size=V),
    # Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied
    "llama-gqa": ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=24,
                             vocab_size=V, tie_embeddings=False, rope_theta=500000.0),
    # Qwen3: QK-norm, head_dim != d_model / n_head, GQA, tied
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=32,
                         max_seq_len=24, vocab_size=V, norm_eps=1e-6, rope_theta=1e6),
    # multi-query attention: one key/value head
    "llama-mqa": ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=1, d_model=32, max_seq_len=24,
                             vocab_size=V),
}
NAMES = sorted(FAMILIES)


def _randomize(model: Decoder, seed: int = 0, scale: float = 0.1) -> Decoder:
    """Perturb every tensor (norm weights and biases included) so a mistake anywhere shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def make(name: str, seed: int = 0, **changes) -> Decoder:
    config = dataclasses.replace(FAMILIES[name], **changes)
    torch.manual_seed(seed)
    return _randomize(Decoder(config), seed).eval()


def tokens(batch: int, length: int, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- causality ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    model = make(name)
    idx = tokens(2, 16)
    with torch.no_grad():
        ref, _ = model(idx)
        for t in (0, 5, 15):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % V
            out, _ = model(changed)
            assert torch.allclose(out[:, :t], ref[:, :t], atol=1e-6, rtol=0), f"position < {t} saw token {t}"
            assert (out[:, t:] - ref[:, t:]).abs().amax(dim=-1).min() > 1e-4  # later positions do see it


@pytest.mark.parametrize("name", NAMES)
def test_batch_rows_are_independent(name):
    model = make(name)
    idx = tokens(3, 12)
    with torch.no_grad():
        together, _ = model(idx)
        alone, _ = model(idx[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5, rtol=0)


# -- KV-cache decoding ------------------------------------------------------------------------------------


def _decode_in_chunks(model: Decoder, idx: torch.Tensor, chunks: list[int], kind=KVCache) -> torch.Tensor:
    assert sum(chunks) == idx.shape[1]
    cache = model.new_cache(batch_size=idx.shape[0], kind=kind)
    outs, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            logits, _ = model(idx[:, pos : pos + n], cache=cache)
            assert logits.shape == (idx.shape[0], n, model.config.vocab_size)
            pos += n
            assert int(cache.pos) == pos
            outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "chunks",
    [
        [7] + [1] * 13,  # prefill, then one token at a time
        [1] * 20,  # token by token from the start
        [5, 3, 1, 4, 2, 5],  # prefill, then chunks of several tokens
        [1, 6, 13],
        [24],  # the whole context at once
    ],
    ids=["prefill+1s", "all-1s", "prefill+chunks", "1+chunks", "full"],
)
@pytest.mark.parametrize("kind", [KVCache, StaticKVCache], ids=["kv", "static"])
def test_kv_cache_matches_full_forward(name, chunks, kind):
    model = make(name)
    idx = tokens(2, sum(chunks))
    with torch.no_grad():
        full, _ = model(idx)
    cached = _decode_in_chunks(model, idx, chunks, kind)
    assert full.abs().max() > 0.1  # the comparison is not between near-zero logits
    assert (cached - full).abs().max().item() < 1e-5


def test_static_cache_reset_and_fixed_shapes():
    model = make("qwen3")
    a, b = tokens(1, 9, seed=3), tokens(1, 9, seed=4)
    cache = model.new_cache(batch_size=1, max_len=16, kind=StaticKVCache)
    with torch.no_grad():
        model(a, cache=cache)
        cache.reset()
        out = torch.cat([model(b[:, :4], cache=cache)[0], model(b[:, 4:5], cache=cache)[0]], dim=1)
        ref, _ = model(b[:, :5])
    assert (out - ref).abs().max() < 1e-5
    assert all(k.shape[2] == 16 for k in cache.k)  # attention always runs over the whole cache


def test_cache_longer_than_the_context_is_refused():
    model = make("gpt2")
    for kind in (KVCache, StaticKVCache):
        with pytest.raises(ValueError, match="max_seq_len"):
            model.new_cache(batch_size=1, max_len=model.config.max_seq_len + 1, kind=kind)


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_last_only(name):
    model = make(name)
    idx = tokens(2, 10)
    cache = model.new_cache(batch_size=2)
    with torch.no_grad():
        full, _ = model(idx)
        first, _ = model(idx[:, :6], cache=cache, last_only=True)
        second, _ = model(idx[:, 6:], cache=cache, last_only=True)
    assert first.shape == (2, 1, V) and second.shape == (2, 1, V)
    assert (first[:, 0] - full[:, 5]).abs().max() < 1e-5
    assert (second[:, 0] - full[:, 9]).abs().max() < 1e-5


def test_kv_cache_reset_reuses_the_cache():
    model = make("llama-gqa")
    a, b = tokens(1, 9, seed=3), tokens(1, 9, seed=4)
    cache = model.new_cache(batch_size=1)
    with torch.no_grad():
        model(a, cache=cache)
        cache.reset()
        out = torch.cat([model(b[:, :4], cache=cache)[0], model(b[:, 4:], cache=cache)[0]], dim=1)
        ref, _ = model(b)
    assert (out - ref).abs().max() < 1e-5


def test_kv_cache_overflow_raises():
    model = make("llama-gqa")
    cache = model.new_cache(batch_size=1, max_len=8)
    with torch.no_grad():
        model(tokens(1, 6), cache=cache)
        with pytest.raises(ValueError):
            model(tokens(1, 3), cache=cache)


# -- sequence length --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_longer_than_max_seq_len_raises(name):
    model = make(name)
    limit = model.config.max_seq_len
    with torch.no_grad():
        assert model(tokens(1, limit))[0].shape == (1, limit, V)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(tokens(1, limit + 1))
        cache = model.new_cache(batch_size=1)
        model(tokens(1, limit - 1), cache=cache)
        with pytest.raises(ValueError, match=f"KV cache full: {limit + 1} positions > max_len={limit}"):
            model(tokens(1, 2), cache=cache)  # the cache checks its own room


# -- loss ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_cross_entropy_of_the_logits(name):
    model = make(name)
    idx, targets = tokens(3, 12, seed=5), tokens(3, 12, seed=6)
    with torch.no_grad():
        logits, aux = model(idx)
        loss = lm_loss(logits, targets)
    assert aux == {}  # today's models add no auxiliary losses
    assert torch.equal(lm_loss(logits, targets, reduction="sum") / targets.numel(), loss)
    expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.allclose(loss, expected, atol=1e-6)
    # and by hand: mean negative log-likelihood of the targets
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(loss, nll.mean(), atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_loss_ignores_minus_100_targets(name):
    model = make(name)
    idx, targets = tokens(2, 12, seed=5), tokens(2, 12, seed=6)
    ignored = torch.zeros_like(targets, dtype=torch.bool)
    ignored[0, :5] = True
    ignored[1, 9:] = True
    masked = targets.masked_fill(ignored, -100)
    with torch.no_grad():
        logits, _ = model(idx)
    loss, loss_all = lm_loss(logits, masked), lm_loss(logits, targets)
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(loss, nll[~ignored].mean(), atol=1e-5)  # mean over the kept positions only
    assert not torch.allclose(loss, loss_all, atol=1e-4)


# -- activation checkpointing ---------------------------------------------------------------------------------


def _loss_and_grads(model: Decoder, idx, targets, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = lm_loss(model(idx)[0], targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, dropout", [(n, 0.0) for n in NAMES] + [("gpt2", 0.1), ("llama-gqa", 0.1)])
def test_activation_checkpointing_same_loss_and_grads(name, dropout):
    model = make(name, dropout=dropout).train()
    idx, targets = tokens(2, 16, seed=7), tokens(2, 16, seed=8)
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks]

    loss_a, grads_a = _loss_and_grads(model, idx, targets, seed=11)
    plain_calls = len(calls)
    model.activation_checkpointing = True
    calls.clear()
    loss_b, grads_b = _loss_and_grads(model, idx, targets, seed=11)
    for h in hooks:
        h.remove()

    assert plain_calls == model.config.n_layer
    assert len(calls) == 2 * model.config.n_layer  # each block really was recomputed in backward
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n
    assert any(g.abs().max() > 0 for g in grads_a.values())


def test_dropout_only_in_train_mode():
    model = make("gpt2", dropout=0.2)
    idx = tokens(1, 10)
    with torch.no_grad():
        a, b = model.eval()(idx)[0], model(idx)[0]
        assert torch.equal(a, b)
        torch.manual_seed(0)
        c = model.train()(idx)[0]
    assert not torch.allclose(a, c, atol=1e-4)


# -- tied embeddings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "llama-mqa"])
def test_tied_embeddings_share_storage(name):
    model = make(name)
    assert model.config.tie_embeddings
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    with torch.no_grad():
        model.embed.weight[3].fill_(0.5)
    assert torch.all(model.lm_head.weight[3] == 0.5)
    # gradients from both uses land on the one tensor
    model.train()
    loss = lm_loss(model(tokens(1, 8))[0], tokens(1, 8, seed=2))
    loss.backward()
    assert model.lm_head.weight.grad is model.embed.weight.grad
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and "lm_head.weight" not in names  # listed (and counted) once


@pytest.mark.parametrize("name", ["gpt2-untied", "llama-gqa"])
def test_untied_embeddings_do_not_share(name):
    model = make(name)
    assert not model.config.tie_embeddings
    assert model.lm_head.weight is not model.embed.weight
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    before = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.embed.weight[3].fill_(0.5)
    assert torch.equal(model.lm_head.weight, before)


def test_tying_changes_the_count_by_one_matrix():
    tied, untied = make("gpt2"), make("gpt2-untied", mlp="gelu_tanh")
    assert untied.num_params() - tied.num_params() == V * 32


# -- initialisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(family="llama", n_layer=8, n_head=4, n_kv_head=2, d_model=256, max_seq_len=64, vocab_size=1000,
                    tie_embeddings=False, init_std=0.03),
        ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, n_layer=8, n_head=4,
                    d_model=192, max_seq_len=512, vocab_size=1000, init_std=0.02),
    ],
    ids=["llama", "gpt2"],
)
def test_initialization_std(config):
    torch.manual_seed(0)
    model = Decoder(config)
    std, residual = config.init_std, config.init_std / math.sqrt(2 * config.n_layer)
    seen_proj = seen_other = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight.detach()
            expected = residual if name.endswith(".proj") else std
            assert w.numel() >= 30_000
            # the sample std of n normals is within ~3/sqrt(2n) of the truth; allow 3%
            assert abs(w.std().item() / expected - 1) < 0.03, (name, w.std().item(), expected)
            assert abs(w.mean().item()) < 4 * expected / math.sqrt(w.numel()), name
            if name.endswith(".proj"):
                seen_proj += 1
            else:
                seen_other += 1
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.all(module.bias == 0), name
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            assert torch.all(module.weight == 1), name
            if getattr(module, "bias", None) is not None:
                assert torch.all(module.bias == 0), name
    assert seen_proj == 2 * config.n_layer  # attn.proj and mlp.proj of every block
    assert seen_other >= config.n_layer * 2 + 1


def test_initialization_is_seeded():
    config = FAMILIES["qwen3"]
    torch.manual_seed(3)
    a = Decoder(config).state_dict()
    torch.manual_seed(3)
    b = Decoder(config).state_dict()
    torch.manual_seed(4)
    c = Decoder(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


# -- accounting ----------------------------------------------------------------------------------------------


def _hand_counts(c: ModelConfig) -> tuple[int, int]:
    """(matmul weights incl. lm_head, all parameters with tied weights once) computed from the shape alone."""
    d, H, K, L = c.d_model, c.n_head, c.n_kv_head or c.n_head, c.n_layer
    Dh = c.head_dim or d // H
    ff = c.d_ff or (4 * d if c.mlp != "swiglu" else 64 * ((8 * d // 3 + 63) // 64))
    qkv, proj = d * (H + 2 * K) * Dh, H * Dh * d
    mlp = (3 if c.mlp == "swiglu" else 2) * d * ff
    matmul = L * (qkv + proj + mlp) + d * c.vocab_size

    norm = (2 if c.norm == "layernorm" and c.bias else 1) * d
    bias = ((H + 2 * K) * Dh + d + ((2 * ff if c.mlp == "swiglu" else ff) + d)) if c.bias else 0
    qk = 2 * Dh if c.qk_norm else 0
    params = c.vocab_size * d + L * (qkv + proj + mlp + 2 * norm + bias + qk) + norm
    if c.pos_emb == "learned":
        params += c.max_seq_len * d
    if not c.tie_embeddings:
        params += c.vocab_size * d
    return matmul, params


@pytest.mark.parametrize("name", NAMES + ["llama-ff"])
def test_flops_and_params_by_hand(name):
    if name == "llama-ff":
        config = dataclasses.replace(FAMILIES["llama-gqa"], d_ff=80, bias=True, n_layer=3)
    else:
        config = FAMILIES[name]
    model = Decoder(config)
    matmul, params = _hand_counts(config)
    c = config
    Dh = c.head_dim or c.d_model // c.n_head
    for T in (1, 16, 24):
        assert model.flops_per_token(T) == 6 * matmul + 12 * c.n_layer * c.n_head * Dh * T
    assert model.num_params() == params
    assert model.num_params() == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb = c.vocab_size * c.d_model + (c.max_seq_len * c.d_model if c.pos_emb == "learned" else 0)
    assert model.num_params(exclude_embeddings=True) == params - emb


def test_flops_known_value_gpt2_small_shape():
    """GPT-2 small at T=1024: 6 * (85M block matmuls + 38.6M lm_head) + 12*12*12*64*1024 (by hand)."""
    config = ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                         n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50257)
    with torch.device("meta"):
        model = Decoder(config)
    block = 768 * 2304 + 768 * 768 + 2 * 768 * 3072
    assert model.flops_per_token(1024) == 6 * (12 * block + 768 * 50257) + 12 * 12 * 12 * 64 * 1024
    assert model.num_params() == 124_439_808


# -- grouped-query / multi-query attention -----------------------------------------------------------------


def test_multi_query_attention_cache_has_one_head():
    model = make("llama-mqa")
    c = model.config
    assert model.blocks[0].attn.qkv.out_features == (c.n_head + 2) * c.dim_head
    cache = model.new_cache(batch_size=3, max_len=20)
    assert cache.k.shape == (c.n_layer, 3, 1, 20, c.dim_head) and cache.v.shape == cache.k.shape
    idx = tokens(3, 12)
    with torch.no_grad():
        full, _ = model(idx)
        a, _ = model(idx[:, :5], cache=cache)
        rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    assert (torch.cat([a, *rest], dim=1) - full).abs().max() < 1e-5
    # the cache holds the keys of every position so far and nothing after
    assert cache.k[:, :, :, :12].abs().sum() > 0 and cache.k[:, :, :, 12:].abs().sum() == 0


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_equals_multi_head_with_shared_kv_weights(n_kv_head):
    """Query head h uses key/value head h // (n_head / n_kv_head): copy those k/v weights into an MHA model."""
    gqa = make("llama-gqa", n_kv_head=n_kv_head)
    mha = make("llama-gqa", n_kv_head=0, seed=9)
    H, Dh, d = 4, 8, 32
    group = H // n_kv_head
    sd = gqa.state_dict()
    for i in range(gqa.config.n_layer):
        key = f"blocks.{i}.attn.qkv.weight"
        q, k, v = sd[key].split([H * Dh, n_kv_head * Dh, n_kv_head * Dh])
        k = k.view(n_kv_head, Dh, d).repeat_interleave(group, dim=0).reshape(H * Dh, d)
        v = v.view(n_kv_head, Dh, d).repeat_interleave(group, dim=0).reshape(H * Dh, d)
        sd[key] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    idx = tokens(2, 14)
    with torch.no_grad():
        assert (gqa(idx)[0] - mha(idx)[0]).abs().max() < 1e-5


# -- seams ------------------------------------------------------------------------------------------------


class BalancedMLP(torch.nn.Module):
    """A stand-in for a mixture-of-experts MLP: its output, and an auxiliary loss beside it."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.inner = mlp

    def forward(self, x):
        return self.inner(x), {"balance": x.pow(2).mean()}


def test_auxiliary_losses_of_blocks_reach_the_caller_summed():
    model = make("llama-gqa")
    idx = tokens(2, 8)
    with torch.no_grad():
        logits, aux = model(idx)
        for block in model.blocks:
            block.mlp = BalancedMLP(block.mlp)
        logits2, aux2 = model(idx)
    assert aux == {} and torch.equal(logits, logits2)
    assert set(aux2) == {"balance"} and aux2["balance"] > 0
    model.activation_checkpointing = True  # the checkpointed path carries them too
    model.train()
    assert torch.allclose(model(idx)[1]["balance"], aux2["balance"])


def test_the_cache_holds_what_attention_declares():
    model = make("llama-gqa")
    cache = model.new_cache(batch_size=2, max_len=16)
    heads, dim = model.blocks[0].attn.cache_shape
    assert (heads, dim) == (model.config.kv_heads, model.config.dim_head)
    assert cache.k.shape == (model.config.n_layer, 2, heads, 16, dim)


@pytest.mark.parametrize("name", NAMES)
def test_a_model_built_on_meta_gets_memory_tied_weights_and_position_tables(name):
    eager = make(name)
    with torch.device("meta"):
        model = Decoder(eager.config)
    model.materialize("cpu").load_state_dict(eager.state_dict())
    assert (model.lm_head.weight is model.embed.weight) == eager.config.tie_embeddings
    idx = tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], eager(idx)[0])  # rotary tables (not in the state dict) included
