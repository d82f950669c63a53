"""Sequences at different lengths decode together in one batch, each as if it were alone."""

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import SlotKVCache

CONFIGS = {
    "llama-gqa": ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=96),
    "gpt2": ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, n_layer=2,
                        n_head=4, d_model=64, vocab_size=96),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_slots_at_different_lengths_match_full_forward(name):
    torch.manual_seed(0)
    model = Decoder(CONFIGS[name]).eval()
    seqs = [torch.randint(0, 96, (n,)).tolist() for n in (5, 11, 2)]
    cache = model.new_cache(batch_size=4, max_len=32, kind=SlotKVCache)
    with torch.no_grad():
        # prefill each prompt (but its last token) into its own slot, in a different order than the slots
        for slot, seq in [(2, seqs[1]), (0, seqs[0]), (3, seqs[2])]:
            cache.select([slot])
            model(torch.tensor([seq[:-1]]), cache=cache)
        # then decode the last tokens of all three in one batch, then one more token each
        cache.select([0, 2, 3])
        last = torch.tensor([[s[-1]] for s in seqs])
        step1, _ = model(last, cache=cache)
        nxt = torch.randint(0, 96, (3, 1))
        step2, _ = model(nxt, cache=cache)
        for b, seq in enumerate(seqs):
            full, _ = model(torch.tensor([seq + [int(nxt[b])]]))
            assert (step1[b, 0] - full[0, -2]).abs().max() < 1e-5
            assert (step2[b, 0] - full[0, -1]).abs().max() < 1e-5
    assert cache.lengths.tolist() == [6, 0, 12, 3]
    cache.free(2)
    assert cache.lengths.tolist() == [6, 0, 0, 3]
