"""LoRA: low-rank adapters on a frozen decoder, saved as a PEFT adapter directory; QLoRA: on a quantized base.

y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r), with A [r, in] initialised as PEFT does (kaiming-uniform,
a=sqrt(5)) and B [out, r] zeros, so an adapted model starts with exactly the base model's logits.

Targets are Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2's
c_attn, c_proj, c_fc), read from `interop/hf.py`'s name table. Our q/k/v and gate/up are fused linears, so a
target such as q_proj adapts only its rows of `attn.qkv`: one (A, B) pair per Hugging Face target, each on its
row slice. The saved adapter then holds exactly the tensors PEFT holds for the unfused transformers model, and
`peft.PeftModel.from_pretrained` loads it onto our exported base directory; `apply_adapter` reads PEFT's.

A training run with train.lora_rank > 0 (`lora_model`) trains only the adapters; its checkpoints and final/
are adapter directories that name their base (modeldir.py writes them), so they hold megabytes, not the base.
Under bf16 autocast the frozen linears are kept in bf16 (autocast made the same numbers of them at every call).
With train.base_quant the frozen linears of the blocks are int8 or int4 (QLoRA) and multiply through their
weight dequantized one layer at a time, forward and backward (`_ThroughFrozen`); the head and the embeddings
stay float. Loading an adapter directory for inference merges it into the float base (`load_adapter_dir`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from commonlm.config import RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError, already_exists
from commonlm.infer.quant import Int4DequantLinear, Int8Linear, replace_modules
from commonlm.interop import hf
from commonlm.model.decoder import Decoder
from commonlm.runtime import pick_dtype
from commonlm.utils import atomic_dir, atomic_write_json, human

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel -> LoraModel -> the transformers model
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FROZEN_KINDS = (nn.Linear, Int8Linear, Int4DequantLinear)  # what an adapter can sit on
# adapter_config.json settings whose non-default values our LoRALinear cannot compute: refused, never ignored
UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
               "layers_pattern", "layer_replication", "target_parameters", "trainable_token_indices", "lora_bias",
               "exclude_modules", "use_qalora")


class _ThroughFrozen(torch.autograd.Function):
    """y = x @ W.T + b for a quantized base, W dequantized for the moment: in the forward (the packed int8
    kernel is made for decoding a few rows; at training's hundreds QLoRA int8 ran 14 tokens/s with it, 277
    without, on qwen3-100m in bench/lora_memory.py) and again in the backward, for the input's gradient
    grad_y @ W. Autograd through F.linear would keep every layer's W in float until the backward, the memory
    QLoRA saves. The base gets no gradient (it is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base, ctx.dtype = base, x.dtype
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return F.linear(x, base.dequantized().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad @ ctx.base.dequantized().to(grad.dtype)).to(ctx.dtype), None


class LoRALinear(nn.Module):
    """A frozen linear `base` (nn.Linear, or a quantized Int8Linear / Int4DequantLinear) plus one low-rank
    adapter per row slice. `parts` maps a Hugging Face module name (e.g. "model.layers.0.self_attn.q_proj")
    to the rows [start, stop) of the base it covers, in row order."""

    def __init__(self, base: nn.Module, parts: dict[str, tuple[int, int]], r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.parts = dict(sorted(parts.items(), key=lambda item: item[1]))
        # ParameterDict keys cannot hold dots: key by the short target name (unique within one linear)
        self.keys = {name: name.rpartition(".")[2] for name in self.parts}
        device = next(iter(base.state_dict().values())).device
        floating = isinstance(base, nn.Linear) and base.weight.dtype in (torch.float32, torch.float64)
        like = {"device": device, "dtype": base.weight.dtype if floating else torch.float32}  # fp32 master weights
        self.lora_A = nn.ParameterDict({k: nn.Parameter(torch.empty(r, self.in_features, **like))
                                        for k in self.keys.values()})
        self.lora_B = nn.ParameterDict({self.keys[n]: nn.Parameter(torch.zeros(b - a, r, **like))
                                        for n, (a, b) in self.parts.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Linear):  # (stored in the autocast dtype by lora_model: x goes to it too)
            y = self.base(x.to(self.base.weight.dtype))
        else:
            y = _ThroughFrozen.apply(x, self.base)
        h = self.dropout(x)
        pieces, at = [], 0  # the deltas side by side, zeros on rows no target covers: one add
        for name, (start, stop) in self.parts.items():
            k = self.keys[name]
            delta = h @ self.lora_A[k].t() @ self.lora_B[k].t()
            if start > at:
                pieces.append(delta.new_zeros(*delta.shape[:-1], start - at))
            pieces.append(delta)
            at = stop
        if at < self.out_features:
            pieces.append(pieces[-1].new_zeros(*pieces[-1].shape[:-1], self.out_features - at))
        return y + torch.cat(pieces, dim=-1) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, placed on each target's rows: what merging adds to the base weight."""
        first = next(iter(self.lora_A.values()))
        delta = first.new_zeros(self.out_features, self.in_features)
        for name, (start, stop) in self.parts.items():
            k = self.keys[name]
            delta[start:stop] = (self.lora_B[k] @ self.lora_A[k]) * self.scale
        return delta


def _adaptable(model: Decoder) -> dict[str, dict[str, tuple[int, int]]]:
    """Our linear module name -> {Hugging Face module name: its rows}, for every linear inside the blocks
    that the family's name table maps (the fused ones split the way `hf.to_hf` splits them)."""
    c, out = model.config, {}
    for name, module in model.named_modules():
        if not isinstance(module, FROZEN_KINDS) or not re.match(r"blocks\.\d+\.", name):
            continue
        theirs = hf.their_names(c.family, f"{name}.weight")
        if theirs is None:
            continue
        rows = hf.split_rows(c, f"{name}.weight") if len(theirs) > 1 else [module.out_features]
        bounds = [sum(rows[:i]) for i in range(len(rows) + 1)]
        out[name] = {t.removesuffix(".weight"): (bounds[i], bounds[i + 1]) for i, t in enumerate(theirs)}
    return out


def _wrap(model: Decoder, chosen: Callable[[str], bool], r: int, alpha: float, dropout: float,
          rslora: bool = False) -> set[str]:
    """Freeze `model` and put adapters on the Hugging Face modules `chosen` accepts; their names."""
    if lora_modules(model):
        raise UserError("the model has LoRA adapters already; merge them first (`commonlm merge`)")
    model.requires_grad_(False)
    found = set()
    for name, parts in _adaptable(model).items():
        picked = {t: rows for t, rows in parts.items() if chosen(t)}
        if picked:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent)
            setattr(holder, child, LoRALinear(getattr(holder, child), picked, r, alpha, dropout, rslora))
            found |= set(picked)
    return found


def add_lora(model: Decoder, r: int, alpha: float, dropout: float = 0.0,
             targets: list[str] | tuple[str, ...] = LLAMA_TARGETS) -> Decoder:
    """Freeze every parameter of `model` and put adapters on the linears of `targets` (Hugging Face module
    names), in place. Returns the model. A target the family does not have is a UserError."""
    if r <= 0:
        raise UserError(f"LoRA rank must be positive, got {r}")
    found = _wrap(model, lambda t: t.rpartition(".")[2] in targets, r, alpha, dropout)
    missing = sorted(set(targets) - {t.rpartition(".")[2] for t in found})
    if missing:
        raise UserError(f"LoRA targets {missing} are not modules of a {model.config.family} model")
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def quantize_base(model: Decoder, mode: str, group_size: int = 32) -> Decoder:
    """QLoRA's frozen base, in place: every linear of the blocks int8 (one scale per output row) or int4 (groups
    of `group_size` inputs; a linear whose inputs do not divide into groups stays float). The embeddings and
    the head stay float."""
    if mode == "int8":
        make = Int8Linear
    elif mode == "int4":
        def make(linear: nn.Linear) -> nn.Module | None:
            return Int4DequantLinear(linear, group_size) if linear.in_features % group_size == 0 else None
    else:
        raise UserError(f"train.base_quant={mode!r}: choose int8 or int4")
    model.requires_grad_(False)
    for block in model.blocks:
        replace_modules(block, nn.Linear, make)
    return model


@torch.no_grad()
def merge_lora(model: Decoder) -> Decoder:
    """Fold scale * B @ A into the base weights and put the plain nn.Linear modules back, in place: the result
    is an ordinary decoder (all parameters trainable again) that saves as an ordinary model directory."""
    for name, module in lora_modules(model).items():
        if not isinstance(module.base, nn.Linear):
            raise UserError("cannot merge an adapter into a quantized base; load the float base and merge into it")
        module.base.weight.add_(module.delta_weight().to(module.base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.base)
    model.requires_grad_(True)
    return model


def adapter_tensors(model: Decoder) -> dict[str, torch.Tensor]:
    """The adapter under PEFT's names: base_model.model.<transformers module>.lora_A.weight / .lora_B.weight."""
    out = {}
    for module in lora_modules(model).values():
        for name, k in module.keys.items():
            for kind, params in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
                out[f"{ADAPTER_PREFIX}{name}.{kind}.weight"] = params[k].detach().to("cpu", torch.float32).contiguous()
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
            "lora_dropout": dropout, "target_modules": targets, "bias": "none", "use_rslora": first.rslora,
            "fan_in_fan_out": model.config.family == "gpt2", "inference_mode": True,
            "base_model_name_or_path": base_model}


def save_adapter(model: Decoder, path: str | Path, base_model: str | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) atomically."""
    with atomic_dir(path, overwrite=True) as tmp:
        write_adapter(tmp, model, base_model)
    return Path(path)


def write_adapter(directory: str | Path, model: Decoder, base_model: str | None = None) -> None:
    """The two PEFT files into an existing directory (modeldir.py adds the rest of a model directory).
    Only a model whose family has a transformers class has a PEFT adapter: a native one is refused."""
    if model.config.family not in hf.NAMES:
        raise UserError(f"no PEFT adapter for family {model.config.family!r}")
    config = adapter_config(model, base_model)
    save_file(adapter_tensors(model), str(Path(directory) / ADAPTER_FILES[1]), metadata={"format": "pt"})
    atomic_write_json(Path(directory) / ADAPTER_FILES[0], config)


def is_adapter_dir(directory: str | Path) -> bool:
    return all((Path(directory) / f).is_file() for f in ADAPTER_FILES)


# -- reading adapters: ours and PEFT's ---------------------------------------------------------------


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json, refused in one line where it asks for something LoRALinear does not compute."""
    directory = Path(directory)
    path = directory / ADAPTER_FILES[0]
    if not path.is_file():
        raise UserError(f"{directory}: not an adapter directory (no {ADAPTER_FILES[0]})")
    if not (directory / ADAPTER_FILES[1]).is_file():
        pickled = " (only adapter_model.bin, a pickle, which CommonLM never loads)" if (
            directory / "adapter_model.bin").is_file() else ""
        raise UserError(f"{directory}: no {ADAPTER_FILES[1]}{pickled}; save the adapter with safetensors")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({e})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (LoRA only)")
    for key in UNSUPPORTED:
        if config.get(key):
            raise UserError(f"{path}: {key}={config[key]!r} is not supported by CommonLM's LoRA; merge the adapter "
                            f"with PEFT (merge_and_unload) and import the merged model instead")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={config['bias']!r} is not supported (bias='none' only)")
    if not config.get("target_modules") or not config.get("r") or "lora_alpha" not in config:
        raise UserError(f"{path}: needs r, lora_alpha and target_modules")
    return config


def _peft_selects(targets: str | list[str]) -> Callable[[str], bool]:
    """PEFT's target_modules matching on a transformers module name: a list matches the whole name or its
    last parts, a string is a regular expression over the whole name, "all-linear" every linear but the head."""
    if targets == "all-linear":
        return lambda name: True
    if isinstance(targets, str):
        return lambda name: re.fullmatch(targets, name) is not None
    return lambda name: any(name == t or name.endswith(f".{t}") for t in targets)


def load_adapter(model: Decoder, directory: str | Path) -> Decoder:
    """Fill the LoRA modules of `model` from the adapter directory's tensors: every one, and nothing else."""
    path = Path(directory) / ADAPTER_FILES[1]
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types, which vary by version
        raise UserError(f"{path} is corrupt ({e})") from e
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}  # with an adapter name
    places = {}
    for module in lora_modules(model).values():
        for name, k in module.keys.items():
            for kind, params in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
                places[f"{ADAPTER_PREFIX}{name}.{kind}.weight"] = params[k]
    extra, missing = sorted(set(tensors) - set(places)), sorted(set(places) - set(tensors))
    if extra or missing:
        what = f"has {extra[0]}, which" if extra else f"lacks {missing[0]}, which"
        raise UserError(f"{directory}: the adapter {what} this {model.config.family} model's adapters "
                        f"{'do not have' if extra else 'need'}; is it the adapter of another base model?")
    with torch.no_grad():
        for key, param in places.items():
            if tensors[key].shape != param.shape:
                raise UserError(f"{directory}: {key} has shape {tuple(tensors[key].shape)}, this base needs "
                                f"{tuple(param.shape)}; the adapter was trained on another base model")
            param.copy_(tensors[key])
    return model


def check_base(directory: str | Path, model: Decoder, tokenizer: Tokenizer | None = None) -> None:
    """Our adapter directories say what they were trained on (commonlm.yaml, tokenizer.json): refuse another
    base. PEFT's say nothing we can check beyond the tensors' names and shapes (load_adapter checks those)."""
    from commonlm.modeldir import read_run_config

    directory = Path(directory)
    if not (directory / "commonlm.yaml").is_file():
        return
    ours, _ = read_run_config(directory)
    if ours.model != model.config:
        raise UserError(f"{directory}: the adapter was trained on another model than this one (its model config "
                        f"differs); give it its own base ({ours.train.init or 'see its commonlm.yaml'})")
    if tokenizer is not None and (directory / "tokenizer.json").is_file() and \
            Tokenizer.load(directory).hash != tokenizer.hash:
        raise UserError(f"{directory}: the adapter was trained with another tokenizer than this model's; give it "
                        f"its own base ({ours.train.init or 'see its commonlm.yaml'})")


def apply_adapter(model: Decoder, directory: str | Path, tokenizer: Tokenizer | None = None) -> Decoder:
    """Put the LoRA adapter of `directory` (ours, or one PEFT saved for this model's transformers export) on
    `model`, in place, unmerged (merge_lora folds it in). Returns the model. With `tokenizer` (the model's),
    an adapter of ours made with another tokenizer is refused too."""
    config = read_adapter_config(directory)
    check_base(directory, model, tokenizer)
    found = _wrap(model, _peft_selects(config["target_modules"]), int(config["r"]), float(config["lora_alpha"]),
                  float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")))
    if not found:
        raise UserError(f"{directory}: target_modules {config['target_modules']!r} name no module of this "
                        f"{model.config.family} model")
    return load_adapter(model, directory)


def load_adapter_dir(directory: str | Path, device: str | torch.device = "cpu",
                     base: str | Path | None = None) -> tuple[Decoder, Tokenizer, RunConfig]:
    """The base model with the adapter of `directory` merged in: a plain decoder, its tokenizer and config.
    `base` defaults to the adapter's base_model_name_or_path. Inference runs on the float base even where
    the adapter was trained on a quantized one (train.base_quant)."""
    from commonlm.api import resolve_model_path
    from commonlm.modeldir import load_model_dir, read_run_config

    directory = Path(directory)
    peft = read_adapter_config(directory)
    base = base or peft.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{directory}: adapter_config.json names no base model (base_model_name_or_path); "
                        f"give the base with --base MODEL")
    if not Path(base).exists():
        raise UserError(f"{directory}: its base model {base} is not on this machine; give the model the adapter "
                        f"was trained on with --base MODEL (or merge it: `commonlm merge {directory} --base MODEL`)")
    model, tokenizer, config = load_model_dir(resolve_model_path(base), device=device)
    merge_lora(apply_adapter(model, directory, tokenizer))
    if (directory / "commonlm.yaml").is_file():  # the fine-tuning run's record
        config, _ = read_run_config(directory)
    config.train.lora_rank, config.train.base_quant = 0, ""  # what it is now: a plain model
    return model, tokenizer, config


def merge_adapter_dir(adapter: str | Path, base: str | Path | None, out: str | Path,
                      overwrite: bool = False) -> Path:
    """`commonlm merge`: base + adapter folded together, written as a plain model directory at `out`."""
    from commonlm.api import resolve_model_path
    from commonlm.modeldir import save_model_dir

    if Path(out).exists() and not overwrite:
        raise already_exists("merge", out)
    adapter = Path(adapter)
    if not is_adapter_dir(adapter):  # a LoRA run: its final/ adapter or newest checkpoint
        adapter = resolve_model_path(adapter)
    model, tokenizer, config = load_adapter_dir(adapter, "cpu", base)
    return save_model_dir(out, model, tokenizer, config)


# -- a LoRA training run ----------------------------------------------------------------------------


def lora_model(config: RunConfig, tokenizer: Tokenizer, device: torch.device, init: str | Path | None = None,
               adapter: str | Path | None = None) -> Decoder:
    """The model a run with train.lora_rank > 0 trains: the frozen base `init` (or train.init; quantized as
    train.base_quant says) with new adapters, or with the adapters of the checkpoint `adapter` (resuming).
    Sets train.init (absolute) and `config.model` to the base's."""
    from commonlm.api import resolve_model_path
    from commonlm.modeldir import load_model_dir

    cfg = config.train
    base = init if init is not None else cfg.init
    if not base:
        raise UserError("train.lora_rank: LoRA trains adapters on a base model; give it with --init MODEL")
    if not Path(base).exists():
        raise UserError(f"train.init: the base model {base} does not exist (a LoRA run reads its base from there, "
                        f"when it starts and when it resumes)")
    base = resolve_model_path(base).resolve()
    model, base_tokenizer, _ = load_model_dir(base, device=device)
    if base_tokenizer.hash != tokenizer.hash:
        raise UserError(f"train.init {base}: its tokenizer differs from the data's; prepare the data with {base}")
    if model.config.family not in hf.NAMES:
        raise UserError(f"train.lora_rank: a {model.config.family} model has no PEFT module names to adapt")
    cfg.init, config.model = str(base), model.config
    if cfg.base_quant:
        quantize_base(model, cfg.base_quant)
    torch.manual_seed(cfg.seed)  # the same adapters on every rank and in every run of this config
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets=targets)
    dtype = pick_dtype(cfg.dtype, device)
    if dtype != torch.float32:  # the frozen base linears as autocast casts them at every call: half the memory
        for module in lora_modules(model).values():
            if isinstance(module.base, nn.Linear):
                module.base.to(dtype)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def describe_lora(model: Decoder, config: RunConfig) -> str:
    """One line for the run's summary: what trains, and on what."""
    t = config.train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    quantized = sum(b.numel() * (2 if isinstance(m, Int4DequantLinear) and n == "codes" else 1)
                    for m in model.modules() if isinstance(m, (Int8Linear, Int4DequantLinear))
                    for n, b in m.named_buffers(recurse=False) if n in ("weight", "codes"))
    base = f"{human(frozen + quantized)} frozen" + (f" ({human(quantized)} as {t.base_quant})" if quantized else "")
    return (f"lora     rank {t.lora_rank} · alpha {t.lora_alpha:g} · {t.lora_targets} · {human(trainable)} trainable "
            f"({100 * trainable / (trainable + frozen + quantized):.2f}%) · base {base} from {t.init}")
