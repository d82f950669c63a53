"""How the model is spread over processes: the seam between building the model and building its optimizer.

    model = build_model(config, device)          # on the meta device when there are no weights to load yet
    model = parallelize(model, config, world, device)
    init_weights(model, seed) or load weights    # now that every parameter has its place
    optimizer = make_optimizer(model, ...)       # over the parameters as parallelize left them

`parallelize` compiles each block (train.compile), then, when torchrun started several processes, either
wraps the model in DDP (train.parallel=ddp: every rank holds the whole model and optimizer) or shards it with
FSDP2 (train.parallel=fsdp: `fully_shard` on each block, then the root; a rank holds 1/N of the weights,
gradients and AdamW moments, and gathers a block's weights just for its forward and backward), or shards it
within groups and replicates it across them (train.parallel=hsdp: FSDP2 on a 2-D mesh of replicas x
train.shard_size; the gathers stay inside a group -- a node, say -- and only the gradient all-reduce crosses
groups, at 1/shard_size of DDP's bytes).

Under fsdp the model is initialised (or loaded) whole on each rank *before* it is sharded, so that a run
starts from exactly the weights one process would (initialising DTensor shards draws other random numbers);
that costs the whole model's weights once per rank at start-up, before any gradient or optimizer state
exists. Sharded state goes to disk through torch.distributed.checkpoint (train/checkpoint.py);
`full_state_dict` gathers the whole weights for model directories, so those look the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from commonlm.config import RunConfig
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder
from commonlm.runtime import pick_dtype
from commonlm.world import World


def build_model(config: RunConfig, meta: bool) -> Decoder:
    """The decoder, without memory behind its parameters when `meta` (to be placed by `init_weights`
    or by loading a checkpoint), else initialised on the host from train.seed."""
    if meta:
        with torch.device("meta"):
            return Decoder(config.model)
    torch.manual_seed(config.train.seed)
    return Decoder(config.model)


def init_weights(model: nn.Module, seed: int, device: torch.device) -> None:
    """Give a model built on the meta device memory on `device` and its initial weights.

    The random draws happen in the order and on the generator they would have when the model is built on
    the host (each layer's own initialisation in construction order, then Decoder.reset_parameters), so
    a run starts from the same weights either way -- on CPU bit for bit; on a GPU from the GPU's
    generator.
    """
    model.materialize(device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                module.reset_parameters()  # what construction on the host draws
        model.reset_parameters()


def parallelize(model: nn.Module, config: RunConfig, world: World, device: torch.device) -> nn.Module:
    """Compile, then wrap (DDP) or shard (FSDP2) for data parallelism. Compiling each block in place first (as
    torchtitan does) keeps parameter names unchanged, and works the same under both."""
    if config.train.compile:
        for block in model.blocks:
            block.compile()
    if world.distributed and config.train.parallel in ("fsdp", "hsdp"):
        mesh = device_mesh(config, world, device)
        return shard(model, mesh, bf16=pick_dtype(config.train.dtype, device) == torch.bfloat16)
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def device_mesh(config: RunConfig, world: World, device: torch.device) -> DeviceMesh:
    """fsdp: one dimension over every process. hsdp: (replicas, shard_size), a shard group being consecutive
    ranks (those of a node, under torchrun's numbering), so FSDP2 shards along the second dimension and
    all-reduces gradients along the first."""
    if config.train.parallel == "fsdp":
        return init_device_mesh(device.type, (world.size,))
    shard_size = config.train.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    if world.size % shard_size:
        raise UserError(f"train.shard_size={shard_size}: the {world.size} processes do not split into groups of "
                        f"that many; choose a divisor of {world.size} (or start a multiple of {shard_size} processes)")
    return init_device_mesh(device.type, (world.size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def shard(model: Decoder, mesh: DeviceMesh, bf16: bool) -> Decoder:
    """FSDP2 in place: each block is one unit of gathering (its weights whole only during its forward and
    backward), the root holds the rest (embeddings, final norm, head: tied weights stay one parameter). With
    bf16 the gathered weights and the computation are bf16 while the sharded weights, the optimizer and the
    gradient reduction stay fp32 (FSDP's mixed precision: what autocast gives one process, at half the traffic)."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def accumulating(model: nn.Module) -> Iterator[None]:
    """A micro-batch's backward that is not the step's last: gradients are summed before they are shared. DDP
    all-reduces only after the last micro-batch. FSDP2 still reduce-scatters after each one (a rank then keeps
    only its shard of the gradients, the memory FSDP is for); under hsdp only the all-reduce across the
    replicas waits for the last one."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model) and next(model.parameters()).device_mesh.ndim == 2:
        model.set_requires_all_reduce(False)
        try:
            yield
        finally:
            model.set_requires_all_reduce(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside whatever `parallelize` wrapped it in (a sharded model is its own)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model, whole, for a checkpoint or a model directory. Called on every rank (a
    sharded model gathers here, a collective, into rank 0's host memory: the other ranks get {}); with DDP
    each rank already holds them all."""
    if is_sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The whole weights on every rank for the duration (a sharded model; nothing to do otherwise): evaluation
    gives the ranks unequal numbers of batches, and a sharded forward is a collective every rank must join.
    Costs the whole model's (bf16 under mixed precision) weights on each rank meanwhile."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # training again: blocks gather for their forward and again for backward; the root (embeddings,
            # head) keeps its weights from forward to backward, as fully_shard sets a root up
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` in total; their norm before, a plain tensor (a sharded model's is
    computed over every rank's shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
