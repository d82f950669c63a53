"""Packed bf16 linears (infer/packed.py) compute what nn.Linear computes, in every shape decoding uses."""

import copy

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.infer.engine import Engine, Request
from commonlm.infer.packed import PackedGeluMLP, PackedLinear, can_pack, pack_linears
from commonlm.model.decoder import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def bf16_model(family: str) -> Decoder:
    torch.manual_seed(0)
    gpt2 = dict(pos_emb="learned", norm="layernorm", bias=True)
    extra = {"gpt2": dict(gpt2, mlp="gelu_tanh"), "gpt2-erf": dict(gpt2, mlp="gelu")}.get(family, {})
    family = family.split("-")[0]
    m = Decoder(ModelConfig(family=family, n_layer=2, n_head=4, d_model=64, vocab_size=192, max_seq_len=64,
                            **extra)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)
    return m.to(torch.bfloat16)


@pytest.mark.parametrize("family", ["gpt2", "gpt2-erf", "llama"])
def test_packed_model_gives_the_same_logits(family):
    plain = bf16_model(family)
    packed = pack_linears(copy.deepcopy(plain))
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 4 + 1
    fused = [m.fc.algorithm for m in packed.modules() if isinstance(m, PackedGeluMLP)]  # GELU inside the matmul
    assert fused == {"gpt2": ["tanh"] * 2, "gpt2-erf": ["none"] * 2, "llama": []}[family]
    idx = torch.randint(0, 192, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain(idx)[0].float(), packed(idx)[0].float()  # prefill-shaped: many rows
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
        caches = plain.new_cache(1), packed.new_cache(1)
        for t in range(6):  # decode-shaped: one row at a time, through the cache
            a, b = (m(idx[:1, t : t + 1], cache=c)[0].float() for m, c in zip((plain, packed), caches))
            assert (b - a).abs().max() <= 0.02 * a.abs().max()


def test_engine_on_a_packed_model_batches_like_it_runs_alone():
    model = pack_linears(bf16_model("llama"))
    prompts = [[5, 9, 11], [100, 3], [7] * 9, [42, 43, 44, 45]]
    alone = []
    for p in prompts:
        engine = Engine(model, max_batch=1)
        seq = engine.submit(Request(prompt_ids=p, max_tokens=12, temperature=0.0))
        while seq.finish_reason is None:
            engine.step()
        alone.append(seq.generated)
    engine = Engine(model, max_batch=4)
    seqs = [engine.submit(Request(prompt_ids=p, max_tokens=12, temperature=0.0)) for p in prompts]
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    assert [s.generated for s in seqs] == alone
    assert len({tuple(a) for a in alone}) > 1


def test_only_bf16_cpu_models_are_packed():
    model = bf16_model("llama").float()
    assert not can_pack(model)
    with pytest.raises(ValueError, match="bf16"):
        pack_linears(model)
