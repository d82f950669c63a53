"""The matrix-vector path of kernels.MatVecLinear computes what nn.Linear computes."""

import torch
import torch.nn.functional as F

from commonlm.kernels import MatVecLinear as Linear


def test_single_row_bf16_matches_linear():
    torch.manual_seed(0)
    layer = Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    got = layer(x)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert got.shape == (1, 1, 48) and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    batch = torch.randn(3, 2, 64, dtype=torch.bfloat16)  # more rows: the ordinary path
    assert torch.equal(layer(batch), F.linear(batch, layer.weight, layer.bias))
    fp32 = Linear(64, 48)
    row = torch.randn(1, 64)
    assert torch.equal(fp32(row), F.linear(row, fp32.weight, fp32.bias))


def test_single_row_under_bf16_autocast_with_fp32_weights():
    """Training evaluates in fp32 weights under bf16 autocast: a one-token last eval window (a val split of
    k * seq_len + 2 tokens) reached the mv path with bf16 input and fp32 weights, and addmv refused the mix."""
    torch.manual_seed(0)
    layer = Linear(64, 48)
    x = torch.randn(1, 1, 64)
    with torch.autocast("cpu", torch.bfloat16):
        got = layer(x.to(torch.bfloat16))
        want = F.linear(x, layer.weight, layer.bias)
    assert got.shape == (1, 1, 48) and torch.equal(got, want)
