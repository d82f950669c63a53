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

A train.parallel=fsdp (or hsdp) run's checkpoint holds its training state sharded, as torch.distributed.checkpoint
(DCP) writes it, in place of optimizer.pt (with train.optimizer=muon, Muon's momentum beside AdamW's moments):
        sharded/                     model and optimizer state: each rank writes its shards (__N_0.distcp), rank 0
                                     the metadata (.metadata); keyed by parameter name, not by rank
and still the consolidated model-directory files (rank 0 gathers the weights), so that it loads in transformers
and `commonlm generate` like any other. DCP reshards on load: such a checkpoint resumes at any number of processes
(the same number continues exactly), and in one process; under hsdp the replicas' identical shards are written
once, and a 2-D mesh's checkpoint loads into fsdp's 1-D one and back.

Each checkpoint is written into a temporary sibling and renamed into place (by rank 0, once every rank has written
its shards), so a crash or SIGKILL while saving leaves the previous checkpoint as the latest complete one. Only the
newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from commonlm.config import RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.modeldir import _unwrap, write_model_files
from commonlm.train.parallel import full_state_dict, is_sharded
from commonlm.utils import atomic_dir, atomic_write_json
from commonlm.world import World, barrier

STEP_DIR = re.compile(r"^step_(\d+)$")
SHARDED = "sharded"  # the DCP directory of a train.parallel=fsdp checkpoint


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
    final = checkpoint_dir(run_dir) / f"step_{int(state['step']):06d}"
    with atomic_dir(final, overwrite=True) as tmp:
        write_model_files(tmp, _unwrap(model), tokenizer, config, weights)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_rng_and_state(tmp, state)
    _keep_last(run_dir, keep_last)
    return final


def save_sharded_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            tokenizer: Tokenizer, config: RunConfig, state: dict[str, Any], keep_last: int,
                            world: World) -> Path | None:
    """Written by every rank together (train.parallel=fsdp, any number of processes): DCP's shards of the model
    and optimizer state from each, the gathered model-directory files and the trainer state from rank 0, which
    renames the whole into place after every rank has finished. The path on rank 0, None on the others."""
    final = checkpoint_dir(run_dir) / f"step_{int(state['step']):06d}"
    weights = full_state_dict(model)  # (collectives: every rank, in the same order)
    model_state, optimizer_state = get_state_dict(model, _parts(optimizer))
    with ExitStack() as publish:
        tmp = publish.enter_context(atomic_dir(final, overwrite=True)) if world.is_main else None
        tmp = _rank0_path(tmp, world, _device_of(model))
        with _one_process_is_meant():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED,
                     no_dist=not world.distributed)
        if world.is_main:
            write_model_files(tmp, model, tokenizer, config, weights)
            _write_rng_and_state(tmp, state)
        barrier(world)  # every rank's shards are on disk: rank 0 renames (leaving the block)
    if not world.is_main:
        return None
    _keep_last(run_dir, keep_last)
    return final


def _parts(optimizer) -> tuple[torch.optim.Optimizer, ...]:
    """What DCP's state-dict helpers take: the optimizer, or the ones a combined optimizer steps (MuonWithAdamW:
    Muon's momentum and AdamW's moments, keyed by parameter name alike)."""
    return tuple(getattr(optimizer, "optimizers", (optimizer,)))


@contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP without a process group warns that it assumes one process: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rank0_path(path: Path | None, world: World, device: torch.device) -> Path:
    """Rank 0's `path` on every rank (a temporary directory's random name), sent as bytes in a tensor."""
    if not world.distributed:
        return path
    buffer = torch.zeros(4096, dtype=torch.uint8, device=device)
    if world.is_main:
        name = str(path).encode()
        buffer[: len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return Path(bytes(buffer[buffer != 0].tolist()).decode())


def _write_rng_and_state(directory: Path, state: dict[str, Any]) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / "rng.pt")
    atomic_write_json(directory / "trainer_state.json", state)


def _keep_last(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    clean_partial(run_dir)


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed save left behind."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def load_training_state(
    ckpt: Path, optimizer: torch.optim.Optimizer, device: torch.device, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Restore optimizer and RNG state in place (and, from a sharded checkpoint, `model`'s weights: on every rank
    together, at whatever number of processes and sharding it now has); return trainer_state.json."""
    sharded = (ckpt / SHARDED).is_dir()
    if model is not None and is_sharded(model) and not sharded:
        raise UserError(f"checkpoint {ckpt} was written by a train.parallel=ddp run (optimizer.pt, not sharded); "
                        f"resume it with --set train.parallel=ddp")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        if sharded:
            if model is None:
                raise ValueError("a sharded checkpoint needs the model to load into")
            model_state, optimizer_state = get_state_dict(model, _parts(optimizer))
            both = {"model": model_state, "optimizer": optimizer_state}
            # into this rank's shards, whatever they are now
            with _one_process_is_meant():
                dcp.load(both, checkpoint_id=ckpt / SHARDED, no_dist=not dist.is_initialized())
            set_state_dict(model, _parts(optimizer), model_state_dict=both["model"], optim_state_dict=both["optimizer"])
        else:
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    except (OSError, ValueError, RuntimeError, dcp.CheckpointException) as e:
        raise UserError(
            f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"delete it to resume from the one before"
        ) from e
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
