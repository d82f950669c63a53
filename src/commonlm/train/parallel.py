"""How the model is spread over processes: the seam between building the model and building its optimizer.

    model = build_model(config, device)          # on the meta device when there are no weights to load yet
    model = parallelize(model, config, world, device)
    init_weights(model, seed) or load weights    # now that every parameter has its place
    optimizer = make_optimizer(model, ...)       # over the parameters as parallelize left them

Today `parallelize` compiles each block (train.compile) and wraps the model in DDP when torchrun started
several processes. Sharding (FSDP2's `fully_shard`) and fault-tolerant or low-communication wrappers plug
in here; `full_state_dict` is where the checkpoint code gathers a sharded model's weights, so neither
the loop nor the checkpoint format has to change for them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from commonlm.config import RunConfig
from commonlm.model.decoder import Decoder
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
    """Compile, then wrap for data parallelism. Compiling each block in place before the wrap (as
    torchtitan does) keeps parameter names unchanged, and works the same under DDP and, later, FSDP."""
    if config.train.compile:
        for block in model.blocks:
            block.compile()
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside whatever `parallelize` wrapped it in."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model, whole, for a checkpoint or a model directory. Called on every rank (a
    sharded model gathers here, a collective); with DDP each rank already holds them all."""
    return unwrap(model).state_dict()
