"""LoRA: low-rank adapters on a frozen decoder, saved as a PEFT adapter directory.

y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r), with A [r, in] initialised as PEFT does (kaiming-uniform,
a=sqrt(5)) and B [out, r] zeros, so an adapted model starts with exactly the base model's logits.

Targets are Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2's
c_attn, c_proj, c_fc), read from `interop/hf.py`'s name table. Our q/k/v and gate/up are fused linears, so a
target such as q_proj adapts only its rows of `attn.qkv`: one (A, B) pair per Hugging Face target, each on its
row slice. The saved adapter then holds exactly the tensors PEFT holds for the unfused transformers model, and
`peft.PeftModel.from_pretrained` loads it onto our exported base directory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from commonlm.errors import UserError
from commonlm.interop import hf
from commonlm.model.decoder import Decoder
from commonlm.utils import atomic_dir, atomic_write_json

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel -> LoraModel -> the transformers model


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` parameters, frozen) plus one low-rank adapter per row slice.

    `parts` maps a Hugging Face module name (e.g. "model.layers.0.self_attn.q_proj") to the rows
    [start, stop) of this linear it covers. Subclassing nn.Linear keeps the base tensors' state-dict names,
    so checkpoints and `isinstance` checks elsewhere see the same model plus `lora_A`/`lora_B` entries."""

    def __init__(self, base: nn.Linear, parts: dict[str, tuple[int, int]], r: int, alpha: float,
                 dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.parts = dict(parts)
        # ParameterDict keys cannot hold dots: key by the short target name (unique within one linear)
        self.keys = {name: name.rpartition(".")[2] for name in self.parts}
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict({k: nn.Parameter(torch.empty(r, self.in_features, **like))
                                        for k in self.keys.values()})
        self.lora_B = nn.ParameterDict({self.keys[n]: nn.Parameter(torch.zeros(b - a, r, **like))
                                        for n, (a, b) in self.parts.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = self.dropout(x)
        for name, (start, stop) in self.parts.items():
            k = self.keys[name]
            delta = (h @ self.lora_A[k].t() @ self.lora_B[k].t()) * self.scale
            y = y + F.pad(delta, (start, self.out_features - stop))  # zero outside this target's rows
        return y

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, placed on each target's rows: what merging adds to `weight`."""
        delta = torch.zeros_like(self.weight)
        for name, (start, stop) in self.parts.items():
            k = self.keys[name]
            delta[start:stop] = (self.lora_B[k] @ self.lora_A[k]) * self.scale
        return delta


def _adaptable(model: Decoder) -> dict[str, dict[str, tuple[int, int]]]:
    """Our linear module name -> {Hugging Face module name: its rows}, for every linear inside the blocks
    that the family's name table maps (the fused ones split the way `hf.to_hf` splits them)."""
    c, out = model.config, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not re.match(r"blocks\.\d+\.", name):
            continue
        theirs = hf._their_names(c.family, f"{name}.weight")
        if theirs is None:
            continue
        rows = hf._split_rows(c, f"{name}.weight") if len(theirs) > 1 else [module.out_features]
        bounds = [sum(rows[:i]) for i in range(len(rows) + 1)]
        out[name] = {t.removesuffix(".weight"): (bounds[i], bounds[i + 1]) for i, t in enumerate(theirs)}
    return out


def add_lora(model: Decoder, r: int, alpha: float, dropout: float = 0.0,
             targets: list[str] | tuple[str, ...] = LLAMA_TARGETS) -> Decoder:
    """Freeze every parameter of `model` and put adapters on the linears of `targets` (Hugging Face module
    names), in place. Returns the model. A target the family does not have is a UserError."""
    if r <= 0:
        raise UserError(f"LoRA rank must be positive, got {r}")
    model.requires_grad_(False)
    plan, found = {}, set()
    for name, parts in _adaptable(model).items():
        chosen = {t: rows for t, rows in parts.items() if t.rpartition(".")[2] in targets}
        found |= {t.rpartition(".")[2] for t in chosen}
        if chosen:
            plan[name] = chosen
    missing = sorted(set(targets) - found)
    if missing:
        raise UserError(f"LoRA targets {missing} are not modules of a {model.config.family} model")
    for name, parts in plan.items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, LoRALinear(getattr(holder, child), parts, r, alpha, dropout))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: Decoder) -> Decoder:
    """Fold scale * B @ A into the base weights and put plain nn.Linear modules back, in place: the result
    is an ordinary decoder (all parameters trainable again) that saves as an ordinary model directory."""
    for name, module in lora_modules(model).items():
        module.weight.add_(module.delta_weight())
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    model.requires_grad_(True)
    return model


def adapter_tensors(model: Decoder) -> dict[str, torch.Tensor]:
    """The adapter under PEFT's names: base_model.model.<transformers module>.lora_A.weight / .lora_B.weight."""
    out = {}
    for module in lora_modules(model).values():
        for name, k in module.keys.items():
            for kind, params in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
                out[f"{ADAPTER_PREFIX}{name}.{kind}.weight"] = params[k].detach().to("cpu").contiguous()
    return out


def adapter_config(model: Decoder, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json for PEFT (LoRA on a causal LM; GPT-2's Conv1D needs fan_in_fan_out)."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise UserError("the model has no LoRA adapters")
    first = modules[0]
    targets = sorted({k for m in modules for k in m.keys.values()})
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
            "lora_dropout": dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": model.config.family == "gpt2", "inference_mode": True,
            "base_model_name_or_path": base_model}


def save_adapter(model: Decoder, path: str | Path, base_model: str | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) atomically.
    Only a model whose family has a transformers class has a PEFT adapter: a native one is refused."""
    if model.config.family not in hf.NAMES:
        raise UserError(f"no PEFT adapter for family {model.config.family!r}")
    config = adapter_config(model, base_model)
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(adapter_tensors(model), str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(Path(tmp) / "adapter_config.json", config)
    return Path(path)
