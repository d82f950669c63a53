"""bf16 linear layers with their weights packed once for oneDNN, for inference on CPU.

`nn.Linear` hands oneDNN a plain row-major weight, which its AMX kernels re-lay out on every call.
Packing each weight once, into oneDNN's blocked layout, made the weight matmuls of batched decode steps
and of prompt prefill about 1.5x faster on this machine, and the server 1.2x faster at 16-64 streams
(BENCHMARKS.md); one row at a time it is as fast as the `torch.mv` path of `kernels.MatVecLinear`.

The packed weights are opaque oneDNN tensors: such a model serves and generates, but is not trained,
saved or compiled. `commonlm serve`, `generate` and `chat` pack bf16 models on CPU (not with --compile
or --quantize).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from commonlm.infer.quant import replace_modules
from commonlm.model.decoder import GeluMLP


def can_pack(model: nn.Module) -> bool:
    weight = next(model.parameters())
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """x @ W.T + b, then optionally GELU (`gelu="none"` or `"tanh"`, as F.gelu's `approximate`) applied by
    oneDNN as the matmul writes its output."""

    def __init__(self, linear: nn.Linear, gelu: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not buffers: an opaque tensor has no place in a state_dict
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.post_op, self.algorithm = ("none", "") if gelu is None else ("gelu", gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.post_op, [], self.algorithm)


class PackedGeluMLP(nn.Module):
    """model.decoder.GeluMLP with its GELU fused into the first matmul: the activation is not written and
    read again (at 64 rows the MLP's first half took 260 instead of 400 us here)."""

    def __init__(self, mlp: GeluMLP):
        super().__init__()
        self.fc = PackedLinear(mlp.fc, gelu=mlp.approximate)
        self.proj = PackedLinear(mlp.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.fc(x))


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a bf16 CPU model by a PackedLinear, and every GeluMLP by a PackedGeluMLP,
    in place (a tied head gets its own packed copy; the embedding table stays as it is)."""
    if not can_pack(model):
        raise ValueError("packing needs a bf16 model on CPU and PyTorch built with oneDNN")
    replace_modules(model, GeluMLP, PackedGeluMLP)
    return replace_modules(model, nn.Linear, PackedLinear)
