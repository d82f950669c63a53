"""Weight-only int8/int4 layers compute what their dequantized weights say, and cost little accuracy."""

import copy

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.infer.quant import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_model, weight_bytes
from commonlm.model.decoder import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_layer_matches_its_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64)
    layer = Int8Linear(linear)
    x = torch.randn(3, 5, 96)
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (64,)
    want = x @ layer.dequantized().t() + linear.bias
    assert (layer(x) - want).abs().max() < 1e-4
    assert (layer.dequantized() - linear.weight).abs().max() <= layer.scale.max() / 2 + 1e-6  # rounding error


def test_int8_off_cpu_path_computes_the_same():
    # the GPU path (cast the weights, scale the output) run on CPU against the packed CPU kernel
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(96, 64, bias=False))
    x = torch.randn(4, 96)
    assert (layer.cast_forward(x) - layer(x)).abs().max() < 1e-4


def test_int4_elsewhere_than_cpu_or_cuda_is_refused():
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match="CPU or CUDA"):
        Int4Linear(linear, 32)


def test_int4_round_trip_and_layer():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, sz = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (4, 64, 2)
    step = sz[..., 0].max()
    assert (dequantize_int4(q, sz, 32) - w).abs().max() <= step / 2 + 1e-5
    linear = torch.nn.Linear(128, 64, bias=False)
    linear.weight.data = w
    x = torch.randn(7, 128)
    assert (Int4Linear(linear, 32)(x) - x @ dequantize_int4(q, sz, 32).t()).abs().max() < 1e-3


@pytest.mark.parametrize("mode,max_rel_err,bytes_ratio", [("int8", 0.02, 0.3), ("int4", 0.15, 0.2)])
def test_quantized_model_stays_close(mode, max_rel_err, bytes_ratio):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(family="llama", n_layer=2, n_head=4, d_model=128, vocab_size=320)).eval()
    quantized = quantize_model(copy.deepcopy(model), mode)
    assert sum(isinstance(m, (Int8Linear, Int4Linear)) for m in quantized.modules()) == 2 * 4 + 1
    idx = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(idx)[0], quantized(idx)[0]
    assert (got - ref).abs().max() / ref.abs().max() < max_rel_err
    assert weight_bytes(quantized) < bytes_ratio * weight_bytes(model) + 4 * 2 * 128 * 4
    assert torch.equal(quantized.embed.weight, model.embed.weight)  # the table stays float
