"""bf16 linear layers with their weights packed once for oneDNN, for inference on CPU.

`nn.Linear` hands oneDNN a plain row-major weight, which its AMX kernels re-lay out on every call.
Packing each weight once, into oneDNN's blocked layout, made the weight matmuls of batched decode steps
and of prompt prefill about 1.5x faster on this machine, and the server 1.2x faster at 16-64 streams
(BENCHMARKS.md); one row at a time it is as fast as the `torch.mv` path of `model.decoder.Linear`.

The packed weights are opaque oneDNN tensors: such a model serves and generates, but is not trained,
saved or compiled. `commonlm serve`, `generate` and `chat` pack bf16 models on CPU (not with --compile
or --quantize).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from commonlm.infer.quant import replace_linears


def can_pack(model: nn.Module) -> bool:
    weight = next(model.parameters())
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not buffers: an opaque tensor has no place in a state_dict
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a bf16 CPU model by a PackedLinear, in place (a tied head gets its own
    packed copy; the embedding table stays as it is)."""
    if not can_pack(model):
        raise ValueError("packing needs a bf16 model on CPU and PyTorch built with oneDNN")
    return replace_linears(model, PackedLinear)
