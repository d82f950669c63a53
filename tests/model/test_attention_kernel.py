"""kernels.attention's CPU bf16 math path computes what SDPA computes, for values narrower or wider than the keys
(latent attention) and a given softmax scale."""

import pytest
import torch
import torch.nn.functional as F

from commonlm.kernels import attention, causal_math_attention


@pytest.mark.parametrize("v_dim", [8, 16, 24])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_the_math_path_equals_sdpa(v_dim, scale):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16)  # 5 new queries after 2 earlier keys
    v = torch.randn(2, 3, 7, v_dim)
    mask = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    assert torch.allclose(causal_math_attention(q, k, v, scale), want, atol=1e-5)


def test_bf16_on_cpu_takes_the_math_path_with_its_scale():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, dtype=torch.bfloat16) for _ in range(3))
    got = attention(q, k, v[..., :8], scale=0.1)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v[..., :8].float(), is_causal=True, scale=0.1)
    assert torch.allclose(got.float(), want, atol=2e-2)
