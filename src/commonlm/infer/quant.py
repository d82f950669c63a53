"""Weight-only quantization for inference: int8 per output channel, int4 in groups along the input.

Decoding one token at a time reads every weight once per step, so its speed is set by bytes of
weights: int8 halves bf16's bytes and int4 quarters them. Activations stay in float. The matmuls use
PyTorch's packed kernels, as gpt-fast does: on CPU `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`,
on CUDA the int4 tensor-core kernel `_weight_int4pack_mm` (bf16 activations) and, for int8, the weight cast
inside `F.linear` with the scale applied to the output (under torch.compile, Inductor fuses the cast into
the matmul). Layers whose shape the int4 kernel cannot take stay in float. The CUDA paths were written
without a GPU at hand: tests/gpu/ checks them when one is.

    quantize_model(model, "int8")            # in place; returns the model
    quantize_model(model, "int4", group_size=32)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 [out, in] and one fp scale per output row."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))  # in the activation dtype: no conversion per call
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def cast_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The path off CPU: the per-row scale commutes with the matmul, so it goes on the output."""
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scale.to(x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale.to(x2.dtype))
        else:
            y = self.cast_forward(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int32 in 0..15 [out, in], scales_zeros [in/group, out, 2]); w ~ (q - 8) * s + z."""
    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    scales_zeros = torch.stack([scale[..., 0], (lo + 8 * scale)[..., 0]], dim=-1).transpose(0, 1).contiguous()
    return q, scales_zeros


def dequantize_int4(q: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = q.shape
    sz = scales_zeros.transpose(0, 1)  # [out, in/group, 2]
    g = q.float().reshape(out_f, -1, group_size) - 8
    return (g * sz[..., :1] + sz[..., 1:]).reshape(out_f, in_f)


def int4_inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 kernel's tiling of the input dimension: in_features must be a multiple of 16x it."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), 0)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups of `group_size` inputs, packed for PyTorch's int4 kernel of the
    device the weights are on (CPU, or CUDA with bf16 activations)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__()
        device = linear.weight.device
        q, scales_zeros = quantize_int4(linear.weight.detach(), group_size)
        self.group_size, self.in_features, self.out_features = group_size, linear.in_features, linear.out_features
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        elif device.type == "cuda":
            if dtype != torch.bfloat16:
                raise ValueError("int4 weights on GPU need bf16 activations (--dtype bf16)")
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # two per byte, the first one high
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, int4_inner_k_tiles(self.in_features))
        else:
            raise ValueError(f"int4 weights run on CPU or CUDA, not {device.type}; use int8 there")
        self.register_buffer("scales_zeros", scales_zeros.to(dtype))
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                          self.scales_zeros.to(x2.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Int4DequantLinear(nn.Module):
    """The int4 format of `quantize_int4` for a frozen base that is trained through (QLoRA): codes stored two
    per byte in plain row-major order, multiplied through the weight dequantized for each call, one layer
    at a time. The packed kernel's layout differs by CPU and has no inverse, and the input gradient needs
    the weight itself (`dequantized`); at 0.5 bytes per weight it holds what Int4Linear holds."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        q, scales_zeros = quantize_int4(linear.weight.detach(), group_size)
        self.group_size, self.in_features, self.out_features = group_size, linear.in_features, linear.out_features
        self.register_buffer("codes", (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8))  # the first code high
        self.register_buffer("scales_zeros", scales_zeros.float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def dequantized(self) -> torch.Tensor:
        q = torch.stack([self.codes >> 4, self.codes & 15], dim=-1).reshape(self.out_features, self.in_features)
        return dequantize_int4(q, self.scales_zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def replace_modules(
    model: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module | None]
) -> nn.Module:
    """Swap each submodule of type `kind` in `model` for `make(module)`, in place, where that is not None."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind) and (replacement := make(child)) is not None:
                setattr(parent, name, replacement)
    return model


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every eligible nn.Linear (all of them in our decoder, the head included) in place.

    `dtype` is the activation dtype the model will run in (scales and biases are kept in it).
    A tied head is quantized as its own copy; the embedding table stays in float.
    """
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r}: choose one of {', '.join(MODES)}")

    def quantized(linear: nn.Linear) -> nn.Module | None:
        if mode == "int8":
            return Int8Linear(linear, dtype)
        fits_int4 = linear.in_features % group_size == 0 and linear.out_features % 8 == 0 and (
            linear.weight.device.type != "cuda" or int4_inner_k_tiles(linear.in_features))
        return Int4Linear(linear, group_size, dtype) if fits_int4 else None

    return replace_modules(model, nn.Linear, quantized)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matmul weight (a tied head counted), norms, biases.

    Embedding tables are left out: a step reads one row of them.
    """
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(("embed.", "pos_embed.", "rotary.")):
            continue
        total += t.numel() * t.element_size()
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight is getattr(getattr(model, "embed", None), "weight", None):
        total += head.weight.numel() * head.weight.element_size()  # tied: listed under embed.weight
    return total
