"""The model directory: the one artifact every stage reads and writes.

    config.json              transformers config of the matching class (GPT2/Llama/Mistral/Qwen2/Qwen3), or
                             "commonlm" (native) with a `commonlm_note` saying why no class represents the model
    model.safetensors        weights under that class's names, or ours when native (fp32 master weights)
    tokenizer.json           + tokenizer_config.json (chat template) + special_tokens_map.json
    generation_config.json   eos/pad ids and default sampling settings
    commonlm.yaml            our full RunConfig (model, data, train) + which weight naming is used

Checkpoints are model directories with training state added (see train/checkpoint.py), so every
verb that takes a model directory also takes a checkpoint.

A model with LoRA adapters (a train.lora_rank run) saves as an adapter directory instead: PEFT's
adapter_config.json (base_model_name_or_path = the base directory) + adapter_model.safetensors in place of
config.json and the weights, and the same tokenizer, generation_config.json and commonlm.yaml (weights:
adapter). Loading one loads its base and merges the adapter in (tune/lora.py's load_adapter_dir).
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from commonlm.config import ModelConfig, RunConfig, config_from_dict
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop import hf
from commonlm.model.decoder import Decoder
from commonlm.tune import lora
from commonlm.utils import atomic_dir, atomic_write_json, atomic_write_text

MODEL_FILES = ("config.json", "commonlm.yaml")  # plus model.safetensors or its sharded index
SHARD_BYTES = 5 * 1024**3  # above this, weights are split into model-0000i-of-0000n.safetensors (as HF does)


def has_weights(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  shard_bytes: int | None = None) -> None:
    """model.safetensors, or shards plus model.safetensors.index.json when larger than `shard_bytes`."""
    shard_bytes = shard_bytes or SHARD_BYTES
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= shard_bytes:
        save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map})


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded. Pickles are refused, never read."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{index} is damaged ({e})") from e
        files = [directory / name for name in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{directory}: shard(s) {', '.join(missing)} named in {index.name} are missing")
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickles:
            raise UserError(
                f"{directory}: only pickle weights ({', '.join(pickles[:3])}); CommonLM never unpickles. "
                "Convert them to safetensors in an environment you trust, then try again"
            )
        raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return files


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, single-file or sharded. Pickles are never read."""
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types, which vary by version
            raise UserError(f"{f} is corrupt ({e}); use an earlier checkpoint") from e
    return tensors


def write_model_files(directory: str | Path, model: Decoder, tokenizer: Tokenizer, config: RunConfig,
                      weights: dict[str, torch.Tensor] | None = None, inference: bool = False) -> None:
    """Write the model-directory files into an existing (usually temporary) directory: a transformers
    directory when the family's class holds every tensor and setting of the model, else the native one; for a
    model with LoRA adapters, an adapter directory. `weights`: the model's whole state dict when the caller
    gathered it already (a sharded model's). `inference`: a model directory, not a checkpoint (`inference_form`)."""
    directory = Path(directory)
    model = _unwrap(model)
    c = model.config
    if lora.lora_modules(model):  # the adapters only, naming their frozen base (train.init)
        lora.write_adapter(directory, model, base_model=config.train.init or None)
        naming = "adapter"
    else:
        weights = model.state_dict() if weights is None else weights
        state = {k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}
        if inference:
            c, state = inference_form(c, state)
            config = dataclasses.replace(config, model=c)
        naming = _write_weights(directory, c, tokenizer, state)
    eos = list(tokenizer.stop_ids)
    atomic_write_json(
        directory / "generation_config.json",
        {"eos_token_id": eos, "pad_token_id": tokenizer.pad_id, "do_sample": True, "temperature": 0.8,
         "top_k": 50, "top_p": 0.95, "max_length": c.max_seq_len},
    )
    tokenizer.save(directory, model_max_length=c.max_seq_len)
    doc = {"weights": naming, **config.to_dict()}
    atomic_write_text(directory / "commonlm.yaml", yaml.safe_dump(doc, sort_keys=False))


def inference_form(c: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model as inference needs it: when auxiliary-loss-free balancing (model.balance_rate, and the pending load
    it steps the bias from) is all that keeps it from the family's transformers class, without them: the bias it
    trained stays (DeepSeek-V3's e_score_correction_bias), so the outputs are the same. A checkpoint keeps both, to
    resume exactly. Else `c` and `state` as they are."""
    if c.balance_rate == 0:
        return c, state
    lean = dataclasses.replace(c, balance_rate=0.0, router_bias=True)  # (the bias the rate stepped, kept)
    kept = {k: v for k, v in state.items() if not k.endswith(".balance_load")}
    return (lean, kept) if hf.hf_incompatibility(lean, kept) is None else (c, state)


def _write_weights(directory: Path, c: ModelConfig, tokenizer: Tokenizer, state: dict[str, torch.Tensor]) -> str:
    """The weights and config.json, under the family's transformers names where they fit, else ours; the naming."""
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    reason = hf.hf_incompatibility(c, state)
    if reason is None:
        naming, tensors, config_json = c.family, hf.to_hf(c, state), hf.hf_config(c, eos_id, tokenizer.pad_id)
    else:  # our names, the tied head stored once (safetensors refuses shared tensors)
        tensors = {k: v.contiguous() for k, v in state.items() if not (c.tie_embeddings and k == "lm_head.weight")}
        naming, config_json = "native", hf.native_config(c, eos_id, tokenizer.pad_id, reason)
    write_weights(directory, tensors, {"format": "pt", "commonlm_weights": naming})
    atomic_write_json(directory / "config.json", config_json)
    return naming


def is_model_dir(directory: str | Path) -> bool:
    """A model directory (or checkpoint) with weights, or an adapter directory (loaded onto its base)."""
    directory = Path(directory)
    return (all((directory / f).is_file() for f in MODEL_FILES) and has_weights(directory)) or \
        lora.is_adapter_dir(directory)


def save_model_dir(path: str | Path, model: Decoder, tokenizer: Tokenizer, config: RunConfig,
                   weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete model directory atomically (replacing an older one at `path`)."""
    with atomic_dir(path, overwrite=True) as tmp:
        write_model_files(tmp, model, tokenizer, config, weights, inference=True)
    return Path(path)


def read_run_config(directory: str | Path) -> tuple[RunConfig, str]:
    """(RunConfig, weight naming) from a model directory's commonlm.yaml."""
    file = Path(directory) / "commonlm.yaml"
    try:
        doc: dict[str, Any] = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UserError(f"{directory}: no commonlm.yaml ({e.strerror}); is this a CommonLM model directory?") from e
    except yaml.YAMLError as e:
        raise UserError(f"{file}: not valid YAML; the model directory is damaged") from e
    weights = doc.pop("weights", "native")
    return config_from_dict(doc), weights


def load_model_dir(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[Decoder, Tokenizer, RunConfig]:
    """Rebuild the model, tokenizer and config saved in a model directory (or checkpoint). An adapter directory
    gives its base model with the adapter merged in."""
    directory = Path(directory)
    if lora.is_adapter_dir(directory):
        return lora.load_adapter_dir(directory, device=device)
    missing = [f for f in MODEL_FILES if not (directory / f).is_file()]
    missing += [] if has_weights(directory) else ["model.safetensors"]
    if missing:
        raise UserError(f"{directory}: not a model directory (missing {', '.join(missing)})")
    config, weights = read_run_config(directory)
    tokenizer = Tokenizer.load(directory)
    check_vocab(tokenizer, config.model, directory)
    with torch.device("meta"):  # no random initialisation to overwrite, no host copy on the way to a GPU
        model = Decoder(config.model)
    load_weights(directory, model.materialize(device), weights)
    return model, tokenizer, config


def load_weights(directory: str | Path, model: Decoder, weights: str) -> None:
    """Fill `model` from a model directory's safetensors, stored under `weights` naming (commonlm.yaml's:
    "native" or the family's). A tensor too many or too few is an error, never skipped. Tensors are read one
    at a time into the model's own: loading holds the model once, not a second copy (2.7x its size before)."""
    directory, c = Path(directory), model.config
    if weights not in ("native", c.family):
        raise UserError(f"{directory}: commonlm.yaml says weights: {weights}, but model.family is {c.family}")
    state = model.state_dict()  # the model's own tensors: each is filled in place, one stored tensor at a time
    tied = {"lm_head.weight"} if c.tie_embeddings else set()
    try:
        table = {k: (k,) for k in state if k not in tied} if weights == "native" else hf.hf_names(c, state)
    except KeyError as e:
        raise UserError(f"{directory}: weights do not match commonlm.yaml ({e})") from e

    def mismatch(why: str) -> UserError:
        return UserError(f"{directory}: weights do not match commonlm.yaml ({why})")

    with ExitStack() as files:
        where = {}  # stored name -> the open file that holds it
        for f in weight_files(directory):
            stored = files.enter_context(_Safetensors(f))
            where.update(dict.fromkeys(stored.header, (f, stored)))
        needed = {name for theirs in table.values() for name in theirs}
        unused = set(where) - needed - tied  # (some checkpoints store a tied head too)
        if unused:
            raise mismatch(f"unexpected weights {sorted(unused)[:3]}")
        if missing := sorted(needed - set(where)):
            raise mismatch(f"missing weights {missing[:3]}")
        for ours, theirs in table.items():
            target, row = state[ours], 0  # a fused tensor's parts fill its rows in turn
            if target.dim() == 3 and len(where[theirs[0]][1].shape(theirs[0])) == 2:
                # stacked experts [E, rows, in] stored one expert's parts after another (transformers' layout):
                # they fill the rows of a view with the first two dimensions as one
                target = target.flatten(0, 1)
            for name in theirs:
                stored = where[name][1]
                flip = weights != "native" and name.endswith(hf.CONV1D)  # GPT-2's Conv1D: [in, out]
                shape = stored.shape(name)
                rows = shape[1 if flip else 0] if len(shape) == 2 else shape[0] if shape else 0
                place = target[row : row + rows] if target.dim() else target
                if tuple(shape[::-1] if flip else shape) != tuple(place.shape):
                    raise mismatch(f"{name} is stored with shape {tuple(shape)}, {ours} of the model is "
                                   f"{tuple(target.shape)}")
                with torch.no_grad():
                    stored.read(name, place.t() if flip else place)
                row += rows
            if target.dim() and row != len(target):
                raise mismatch(f"{ours}: its stored parts {list(theirs)} fill {row} of its {len(target)} rows")


class _Safetensors:
    """One safetensors file (an 8-byte header length, a JSON header, the tensors' bytes), each tensor read with
    one plain read into memory of its own. safetensors' own reader maps the file: the mapped pages counted as
    this process's memory too, on top of the model they were copied into."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        try:
            size = int.from_bytes(self.file.read(8), "little")
            self.header = json.loads(self.file.read(size))
            self.header.pop("__metadata__", None)
            self.start = 8 + size
        except (ValueError, OSError, MemoryError) as e:
            self.file.close()
            raise self.corrupt(e) from e

    def corrupt(self, why: object) -> UserError:
        return UserError(f"{self.path} is corrupt ({why}); use an earlier checkpoint")

    def shape(self, name: str) -> list[int]:
        try:
            return [int(n) for n in self.header[name]["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise self.corrupt(f"the header's entry for {name}: {e}") from e

    def read(self, name: str, into: torch.Tensor) -> None:
        """Tensor `name` into `into` (of its shape): straight into its memory where the dtype and layout allow."""
        try:
            info = self.header[name]
            begin, end = info["data_offsets"]
            dtype = self.DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise self.corrupt(f"the header's entry for {name}: {e}") from e
        direct = into.dtype == dtype and into.is_contiguous() and into.device.type == "cpu"
        tensor = into if direct else torch.empty(into.shape, dtype=dtype)
        raw = tensor.reshape(-1).view(torch.uint8)
        if raw.numel() != end - begin:
            raise self.corrupt(f"{name} holds {end - begin} bytes, its shape and dtype need {raw.numel()}")
        self.file.seek(self.start + begin)
        if raw.numel() and self.file.readinto(memoryview(raw.numpy())) != raw.numel():
            raise self.corrupt(f"{name} is cut short")
        if not direct:
            into.copy_(tensor)

    def __enter__(self) -> _Safetensors:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def check_vocab(tokenizer: Tokenizer, model: ModelConfig, where: str | Path) -> None:
    """Refuse a tokenizer with ids past the embedding table (say, tokenizer.json replaced after training):
    generation crashed with an IndexError at the first such id."""
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {model.vocab_size}; "
            "this tokenizer.json is not the one the model was made with (restore that one, e.g. from a checkpoint "
            "or the prepared data directory)"
        )


def _unwrap(model: torch.nn.Module) -> Decoder:
    """The plain Decoder inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
