"""Multi-head latent attention (model/mla.py): the cache keeps the latent and the shared rotary key only, and every
cache (one position, slots through the engine, static, packed rows) gives the logits of no cache; training through
the loop; config errors name the field."""

import dataclasses

import pytest
import torch

from commonlm.config import ModelConfig, load_config
from commonlm.errors import UserError
from commonlm.infer.engine import Engine, Request
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import PackedRows, SlotKVCache, StaticKVCache
from commonlm.model.mla import LatentAttention
from commonlm.modeldir import load_model_dir
from commonlm.train.trainer import train
from tests.train.test_trainer import small_config, train_losses

# values wider than the query/key heads' 8 + 8 would be narrower: both widths pad through attention()
MLA = ModelConfig(family="deepseek_v3", n_layer=2, n_head=4, d_model=64, vocab_size=96, max_seq_len=48,
                  tie_embeddings=False, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=12)
VARIANTS = {
    "latent": MLA,
    "plain-q-wide-v": dataclasses.replace(MLA, q_lora_rank=0, v_head_dim=24),
    "window": dataclasses.replace(MLA, family="llama", sliding_window=6),
    "moe": dataclasses.replace(MLA, n_experts=4, experts_per_token=2, expert_ff_dim=16, n_shared_experts=1,
                               router_score="sigmoid", router_bias=True, expert_groups=2, dense_layers=1),
}


def make(name: str) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(VARIANTS[name]).eval()
    with torch.no_grad():  # non-trivial norms, so the latent's norm matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_the_cache_holds_the_latent_and_the_rotary_key_only():
    model = make("latent")
    assert isinstance(model.blocks[0].attn, LatentAttention)
    cache = model.new_cache(batch_size=2, max_len=16)  # [layers, rows, 1, positions, latent 16 + rotary key 8]
    assert cache.k.shape == (2, 2, 1, 16, 24) and cache.v.numel() == 0
    slots = model.new_cache(batch_size=2, max_len=16, kind=SlotKVCache)
    assert slots.k.shape == (2, 2, 16, 1, 24) and slots.v.numel() == 0
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5], [6, 7, 8]]), cache=cache)
    attn = model.blocks[1].attn
    with torch.no_grad():
        h, _ = model.blocks[0](model.embed(torch.tensor([[3, 4, 5], [6, 7, 8]])), model.rotary(0, 3))
        latent = attn.kv_norm(attn.kv_a(model.blocks[1].norm1(h))[..., :16])
    assert torch.allclose(cache.k[1, :, 0, :3, :16], latent, atol=1e-6)  # the normalised latent, as computed


@pytest.mark.parametrize("name", ["latent", "plain-q-wide-v", "window"])
def test_absorbed_decoding_equals_up_projecting_the_cache(name):
    model = make(name)
    idx = torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(2))
    outs = []
    for absorb in (True, False):
        for block in model.blocks:
            block.attn.absorb = absorb
        cache = model.new_cache(2, 16, kind=SlotKVCache)
        with torch.no_grad():
            model(idx[:, :8], cache=cache)
            outs.append(torch.cat([model(idx[:, t : t + 1], cache=cache)[0] for t in range(8, 14)], dim=1))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["KVCache", "SlotKVCache", "StaticKVCache"])
def test_prefill_then_one_token_at_a_time_equals_no_cache(name, kind):
    model = make(name)
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, 24) if kind == "KVCache" else model.new_cache(
            2, 24, kind=SlotKVCache if kind == "SlotKVCache" else StaticKVCache)
        steps = [model(idx[:, :7], cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_packed_rows_equal_each_sequence_alone():
    model = make("latent")
    a, b = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 11))
    segments = torch.tensor([[0] * 9 + [1] * 11])
    with torch.no_grad():
        packed, _ = model(torch.cat([a, b], dim=1), cache=PackedRows(segments))
        alone = torch.cat([model(a)[0], model(b)[0]], dim=1)
    assert (packed - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["latent", "moe"])
def test_the_engine_decodes_two_requests_of_different_lengths_as_recomputing_would(name):
    model = make(name)
    prompts = [[5, 17, 3, 88, 41, 9, 60, 2, 33, 70, 12], [7, 7, 19], [7, 7, 19]]  # (the twin's prefill is copied)

    def recomputed(prompt, n):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        return ids[len(prompt):]

    expected = [recomputed(p, 12) for p in prompts]
    engine = Engine(model, max_batch=3, prefill_chunk=4)  # chunked prefill, then the rows decoding together
    seqs = engine.run_all([Request(prompt_ids=p, max_tokens=12, temperature=0.0) for p in prompts])
    assert [s.generated for s in seqs] == expected


def test_a_tiny_latent_attention_model_trains_through_the_loop_and_saves_as_deepseek_v3(byte_data, tmp_path):
    # bf16 on CPU takes attention()'s math path for short causal rows: values narrower than keys pad through it
    overrides = ["model.family=deepseek_v3", "model.kv_lora_rank=32", "model.q_lora_rank=32",
                 "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
                 "model.tie_embeddings=false", "train.max_steps=12", "train.lr=3e-3", "train.dtype=bf16"]
    config = small_config(byte_data, *overrides)
    result = train(config, tmp_path / "run")
    losses = train_losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    model, _, saved = load_model_dir(result.final_dir)
    assert saved.model.family == "deepseek_v3" and isinstance(model.blocks[1].attn, LatentAttention)
    assert (result.final_dir / "config.json").read_text().count('"model_type": "deepseek_v3"') == 1


@pytest.mark.parametrize("overrides, field", [
    (["model.family=deepseek_v3"], "model.kv_lora_rank"),
    (["model.kv_lora_rank=16"], "model.qk_nope_head_dim"),
    (["model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=7", "model.v_head_dim=8"],
     "model.qk_rope_head_dim"),
    (["model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
      "model.n_kv_head=2"], "model.n_kv_head"),
    (["model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
      "model.head_dim=32"], "model.head_dim"),
    (["model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
      "model.pos_emb=learned"], "model.pos_emb"),
    (["model.rope_mscale_all_dim=1.0"], "model.rope_mscale_all_dim"),
    (["model.n_experts=4", "model.expert_groups=3"], "model.expert_groups"),
    (["model.n_experts=4", "model.expert_groups=2", "model.groups_per_token=3"], "model.groups_per_token"),
    (["model.n_experts=8", "model.expert_groups=4", "model.experts_per_token=3"], "model.experts_per_token"),
    (["model.n_experts=4", "model.dense_layers=4"], "model.dense_layers"),
    (["model.dense_layers=1"], "model.dense_layers"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_a_quantized_latent_model_decodes_through_the_up_projection():
    # an int8 kv_b has no plain weight matrix to absorb: one-token steps up-project the cache as prefill does
    from commonlm.infer.quant import quantize_model

    model = quantize_model(make("latent"), "int8")
    assert not isinstance(model.blocks[0].attn.kv_b, torch.nn.Linear)
    idx = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(1, 16)
        steps = [model(idx[:, :6], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(6, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_compiled_decode_step_absorbs_as_eager_decoding_does():
    from tests.infer.test_compiled import compiled_logits_match

    assert compiled_logits_match(make("latent")) < 1e-4


def test_flops_count_the_values_at_their_own_width():
    c = VARIANTS["plain-q-wide-v"]
    model = Decoder(c)
    matmul = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    scores, weighted = 6 * c.n_head * (8 + 8), 6 * c.n_head * 24  # q k^T over 16 dims, values 24 wide
    assert model.flops_per_token(10) == 6 * matmul + c.n_layer * (scores + weighted) * 10
