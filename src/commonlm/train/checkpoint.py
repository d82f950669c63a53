"""Checkpoints: a model directory plus what it takes to continue training exactly.

    runs/x/checkpoints/step_000500/
        (model directory files)      config.json, model.safetensors, tokenizer.json, commonlm.yaml, ...
        optimizer.pt                 optimizer state (torch.save of tensors; loaded with weights_only=True)
        trainer_state.json           step, tokens, data position, best validation loss, ...
        rng.pt                       torch CPU (and CUDA) generator states

A LoRA run's checkpoint (train.lora_rank > 0) holds its adapter directory instead of the model files:
adapter_config.json + adapter_model.safetensors (the trainable tensors, naming the base train.init), the
tokenizer and commonlm.yaml; resuming loads the base from train.init again (quantized as before) and the
adapters from here, and the optimizer state covers the adapters only.

Each checkpoint is written into a temporary sibling and renamed into place, so a crash or SIGKILL
while saving leaves the previous checkpoint as the latest complete one. Only the newest `keep_last`
are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from commonlm.config import RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.modeldir import _unwrap, write_model_files
from commonlm.utils import atomic_dir, atomic_write_json

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp-*` leftovers are not complete)."""
    root = checkpoint_dir(Path(run_dir))
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Tokenizer,
    config: RunConfig,
    state: dict[str, Any],
    keep_last: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Written by one process (rank 0); `weights` is the whole model's state dict when the caller gathered it
    (train/parallel.py's full_state_dict: a sharded model's weights live on every rank)."""
    step = int(state["step"])
    final = checkpoint_dir(run_dir) / f"step_{step:06d}"
    with atomic_dir(final, overwrite=True) as tmp:
        write_model_files(tmp, _unwrap(model), tokenizer, config, weights)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        atomic_write_json(tmp / "trainer_state.json", state)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    clean_partial(run_dir)
    return final


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed save left behind."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def load_training_state(
    ckpt: Path, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, Any]:
    """Restore optimizer and RNG state in place; return trainer_state.json."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        opt_state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(
            f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"delete it to resume from the one before"
        ) from e
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
