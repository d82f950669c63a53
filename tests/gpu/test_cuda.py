"""CUDA paths, run where a GPU is (this project's CI has none; GPU sessions run `bench/gpu_session.sh`,
which runs these first). Each compares the GPU against the CPU computing the same thing."""

import copy

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.infer.generate import generate_ids
from commonlm.infer.quant import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_model
from commonlm.model.decoder import Decoder
from tests.infer.test_compiled import compiled_and_eager_logits
from tests.infer.test_generate import greedy_disagreements

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model(family: str = "llama") -> Decoder:
    torch.manual_seed(0)
    extra = dict(pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True) if family == "gpt2" else {}
    config = ModelConfig(family=family, n_layer=2, n_head=4, d_model=128, vocab_size=384, max_seq_len=128, **extra)
    m = Decoder(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)  # peaky logits: greedy tokens differ from prompt to prompt
    return m


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cuda_logits_match_cpu(family):
    cpu = model(family)
    gpu = copy.deepcopy(cpu).cuda()
    idx = torch.randint(0, 384, (2, 64))
    with torch.no_grad():
        want, got = cpu(idx)[0], gpu(idx.cuda())[0].cpu()
    assert (got - want).abs().max() / want.abs().max() < 1e-3  # TF32 may be on


def test_cuda_compiled_step_matches_eager():
    steps, full = compiled_and_eager_logits(model("llama").cuda())
    assert (steps - full).abs().max() / full.abs().max() < 1e-3


def test_cuda_compiled_bf16_greedy_matches_cpu():
    cpu = model("gpt2").to(torch.bfloat16).float()  # the GPU's bf16 weights, in fp32 on the CPU
    gpu = copy.deepcopy(cpu).cuda().to(torch.bfloat16)
    tokens = generate_ids(gpu, [5, 17, 99], max_tokens=24, temperature=0.0, compile=True)
    assert len(tokens) == 24 and len(set(tokens)) > 1
    assert greedy_disagreements(cpu, [5, 17, 99], tokens) == []


def test_cuda_int8_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).cuda().to(torch.bfloat16)
    layer = Int8Linear(linear, torch.bfloat16)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ layer.dequantized().t() + linear.bias.float()
    assert (layer(x).float() - want).abs().max() / want.abs().max() < 2e-2


@pytest.mark.parametrize("in_features", [256, 96])  # 8 inner k-tiles, then 2
def test_cuda_int4_layer(in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 128, bias=False).cuda().to(torch.bfloat16)
    layer = Int4Linear(linear, 32, torch.bfloat16)
    q, sz = quantize_int4(linear.weight.detach().float().cpu(), 32)
    x = torch.randn(5, in_features, device="cuda", dtype=torch.bfloat16)
    want = x.float().cpu() @ dequantize_int4(q, sz, 32).t()
    assert (layer(x).float().cpu() - want).abs().max() / want.abs().max() < 2e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cuda_quantized_greedy_matches_cpu(mode):
    """The same weights quantized on each device (CPU kernels are tested in tests/infer): the GPU's greedy tokens
    are the CPU's choices after the same prefix."""
    cpu = quantize_model(model("llama").to(torch.bfloat16), mode, dtype=torch.bfloat16)
    gpu = quantize_model(model("llama").cuda().to(torch.bfloat16), mode, dtype=torch.bfloat16)
    kinds = [type(x) for x in gpu.modules()]
    assert (Int8Linear if mode == "int8" else Int4Linear) in kinds
    assert kinds == [type(x) for x in cpu.modules()]  # the same layers quantized on both
    tokens = generate_ids(gpu, [1, 2, 3], max_tokens=16, temperature=0.0)
    assert len(tokens) == 16 and len(set(tokens)) > 1
    assert greedy_disagreements(cpu, [1, 2, 3], tokens) == []
