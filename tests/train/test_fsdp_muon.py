"""train.optimizer=muon under FSDP2 (train.parallel=fsdp) in two CPU processes under torchrun: the sharded run's
losses are DDP's with gradient accumulation, Muon's momentum goes to disk through DCP beside AdamW's moments, a run
stopped and resumed at the same world size continues value for value, and at one process closely."""

import json
import textwrap

import pytest
from torch.distributed.checkpoint import FileSystemReader

from commonlm.train.checkpoint import SHARDED, latest_checkpoint
from commonlm.train.trainer import resume_config, train
from tests.procs import torchrun
from tests.train.test_trainer import SMALL, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")
# 2 processes x micro-batch 4 x 32 tokens = 256 tokens; 512 a step: two micro-batches each
STEPS = ["train.optimizer=muon", "train.lr=3e-3", "train.max_steps=6", "train.ckpt_every=3",
         "train.tokens_per_step=512"]


@pytest.mark.slow
def test_muon_under_fsdp_trains_like_ddp_and_resumes_exactly(byte_data, tmp_path):
    script = tmp_path / "fsdp_muon.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import shutil
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor
        from commonlm.config import load_config
        from commonlm.train.optim import MuonWithAdamW, make_optimizer
        from commonlm.train.parallel import build_model, parallelize
        from commonlm.world import init_world
        from commonlm.train.trainer import resume_config, train

        def config(*extra):
            c = load_config("tiny", {SMALL + STEPS!r} + list(extra))
            c.data.path = {str(byte_data)!r}
            return c

        # one step from the same gradients: the sharded matrices' update is one process's, bit for bit; torch's
        # Muon stepping the DTensors as they are (Newton-Schulz through sharded bf16 matmuls) is not
        world = init_world("cpu")
        c = config("train.parallel=fsdp", "model.vocab_size=320")
        whole = build_model(c, meta=False)
        sharded = parallelize(build_model(c, meta=False), c, world, torch.device("cpu"))
        steps = {{"whole": make_optimizer(whole, c.train, torch.device("cpu")),
                  "sharded": make_optimizer(sharded, c.train, torch.device("cpu"))}}
        steps["dtensor"] = MuonWithAdamW(torch.optim.Muon(steps["sharded"].muon.param_groups[0]["params"],
                                         lr=c.train.lr, weight_decay=c.train.weight_decay,
                                         adjust_lr_fn=c.train.muon_adjust_lr), steps["sharded"].adamw, 1.0)
        generator = torch.Generator().manual_seed(0)
        grads = {{name: torch.randn(p.shape, generator=generator) for name, p in whole.named_parameters()}}
        after = {{}}
        for kind, optimizer in steps.items():
            model = whole if kind == "whole" else sharded
            for name, p in model.named_parameters():
                p.grad = distribute_tensor(grads[name], p.device_mesh, p.placements) if kind != "whole" else grads[name]
            before = {{name: p.detach().clone() for name, p in model.named_parameters()}}
            optimizer.step()
            after[kind] = {{name: (p.detach() - before[name]) for name, p in model.named_parameters()}}
            after[kind] = {{k: (v.full_tensor() if kind != "whole" else v) for k, v in after[kind].items()}}
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(before[name])
        matrix = "blocks.0.mlp.proj.weight"
        if world.is_main:
            json.dump({{kind: {{k: (after[kind][k] - after["whole"][k]).abs().max().item() for k in grads}}
                       for kind in ("sharded", "dtensor")}}, open({str(tmp_path / "update.json")!r}, "w"))

        train(config("train.parallel=ddp"), {str(tmp_path / "ddp")!r})
        train(config("train.parallel=fsdp"), {str(tmp_path / "fsdp")!r})
        train(config("train.parallel=fsdp"), {str(tmp_path / "split")!r}, stop_at_step=3)
        if world.is_main:
            shutil.copytree({str(tmp_path / "split")!r}, {str(tmp_path / "shrunk")!r})
        dist.barrier()
        train(resume_config({str(tmp_path / "split")!r}), {str(tmp_path / "split")!r}, resume=True)
    """))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    update = json.loads((tmp_path / "update.json").read_text())
    assert set(update["sharded"].values()) == {0.0}, update["sharded"]  # every parameter, to the bit
    assert max(update["dtensor"].values()) > 1e-5, update["dtensor"]  # (~1% of a tall matrix's update)

    ddp, fsdp = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) == 6 and ddp[-1] < ddp[0] - 0.3  # (it trains)
    # the same gradients (summed over two ranks either way), the same whole-matrix Newton-Schulz
    assert max(abs(a - b) / abs(b) for a, b in zip(fsdp, ddp)) < 1e-5, (fsdp, ddp)
    assert train_losses(tmp_path / "split") == fsdp  # resumed at the same world size: value for value

    # the two processes' step-3 checkpoint continued by one: Muon's momentum resharded (into whole matrices)
    config = resume_config(tmp_path / "shrunk")
    config.train.micro_batch_size = 8  # (the same 512 tokens a step)
    train(config, tmp_path / "shrunk", resume=True)
    shrunk = train_losses(tmp_path / "shrunk")
    assert len(shrunk) == 6 and shrunk[:3] == fsdp[:3], shrunk
    assert max(abs(a - b) / abs(b) for a, b in zip(shrunk, fsdp)) < 1e-5, (shrunk, fsdp)

    # Muon's momentum buffers are in the DCP checkpoint, by parameter name, beside AdamW's moments
    saved = FileSystemReader(str(latest_checkpoint(tmp_path / "fsdp") / SHARDED)).read_metadata().state_dict_metadata
    assert "optimizer.state.blocks.0.attn.qkv.weight.momentum_buffer" in saved
    assert "optimizer.state.embed.weight.exp_avg" in saved
