"""FSDP2 (train.parallel=fsdp) in two CPU processes under torchrun (gloo on 127.0.0.1): the sharded model starts
from one process's weights bit for bit, trains (and fine-tunes) like one process with the same global batch, and
its DCP checkpoints resume exactly at two processes and correctly at one (and one process's at two); checkpoints
and the final model directory hold the whole (consolidated) weights."""

import shutil
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from commonlm.config import load_config
from commonlm.errors import UserError
from commonlm.modeldir import load_model_dir
from commonlm.train.checkpoint import SHARDED, latest_checkpoint
from commonlm.train.parallel import build_model
from commonlm.train.trainer import resume_config, train
from commonlm.tune.sft import sft_config
from tests.procs import torchrun
from tests.train.test_trainer import SMALL, small_config, train_losses
from tests.tune.conftest import base_and_data as make_base_and_data
from tests.tune.test_sft import SMALL as SFT_SMALL
from tests.tune.test_sft import conversations

pytestmark = pytest.mark.usefixtures("one_thread")
# 2 processes x micro-batch 4 x 32 tokens = 256 tokens a step; one process reaches it with 2 micro-batches
STEPS = ["train.max_steps=6", "train.ckpt_every=3", "train.lr=3e-3", "train.tokens_per_step=256",
         "train.eval_every=3"]
FSDP = ["train.parallel=fsdp"]


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_at_two_and_at_one(byte_data, tmp_path):
    overrides = SMALL + STEPS + FSDP
    # a one-process run's (sharded) checkpoint of step 3, for the two processes to continue
    train(small_config(byte_data, *STEPS, *FSDP, "train.micro_batch_size=8"), tmp_path / "grown", stop_at_step=3)
    # one torchrun start for all of it: the initial weights, an uninterrupted run, a run stopped after step 3 (copied
    # for the one-process resume below) and resumed, the one-process run continued, and a short bf16 run
    script = tmp_path / "fsdp_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, shutil
        import torch
        import torch.distributed as dist
        from safetensors.torch import save_file
        from commonlm.config import load_config
        from commonlm.train.parallel import build_model, full_state_dict, init_weights, parallelize
        from commonlm.train.trainer import resume_config, train
        from commonlm.world import init_world

        def config(*extra):
            c = load_config("tiny", {overrides!r} + list(extra))
            c.data.path = {str(byte_data)!r}
            return c

        world = init_world("cpu")
        c = config("model.vocab_size=320")
        model = build_model(c, meta=True)  # the trainer's order: meta build, initialise whole, then shard
        init_weights(model, c.train.seed, torch.device("cpu"))
        model = parallelize(model, c, world, torch.device("cpu"))
        weights = full_state_dict(model)
        if world.is_main:
            save_file({{k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}},
                      {str(tmp_path / "init.safetensors")!r})

        train(config(), {str(tmp_path / "fsdp")!r})
        train(config(), {str(tmp_path / "split")!r}, stop_at_step=3)
        if world.is_main:
            shutil.copytree({str(tmp_path / "split")!r}, {str(tmp_path / "shrunk")!r})
        dist.barrier()
        train(resume_config({str(tmp_path / "split")!r}), {str(tmp_path / "split")!r}, resume=True)
        grown = resume_config({str(tmp_path / "grown")!r})
        grown.train.micro_batch_size = 4  # (per process: the same 256 tokens a step)
        train(grown, {str(tmp_path / "grown")!r}, resume=True)
        train(config("train.dtype=bf16", "train.max_steps=2", "train.eval_every=0"), {str(tmp_path / "bf16")!r})
    """))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # sharded after a whole initialisation: the weights one process starts from, bit for bit
    host = build_model(load_config("tiny", overrides + ["model.vocab_size=320"]), meta=False).state_dict()
    init = load_file(str(tmp_path / "init.safetensors"))
    assert init and all(torch.equal(init[k], host[k]) for k in init)

    # one process, the same 256 tokens a step (2 micro-batches of 4): the same windows, the same losses
    single = train(small_config(byte_data, *STEPS), tmp_path / "single")
    sharded, one = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "single")
    assert len(sharded) == len(one) == 6
    assert max(abs(a - b) for a, b in zip(sharded, one)) < 1e-4, (sharded, one)
    assert train_losses(tmp_path / "split") == sharded  # resumed at the same world size: value for value

    # checkpoints: DCP shards (one file per rank) beside whole, loadable weights; no optimizer.pt
    ckpt = latest_checkpoint(tmp_path / "fsdp")
    assert sorted(p.name for p in (ckpt / SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "optimizer.pt").exists()
    final, _, _ = load_model_dir(tmp_path / "fsdp" / "final")  # consolidated, like any model directory
    for key, value in single.model.state_dict().items():
        assert torch.allclose(final.state_dict()[key], value, atol=1e-4), key
    from_ckpt, _, _ = load_model_dir(ckpt)
    assert all(torch.equal(from_ckpt.state_dict()[k], v) for k, v in final.state_dict().items())

    # the two-process checkpoint of step 3, resumed in one process: it continues to step 6, close to the others
    resumed = train(resume_config(tmp_path / "shrunk"), tmp_path / "shrunk", resume=True)
    shrunk = train_losses(tmp_path / "shrunk")
    assert resumed.step == 6 and len(shrunk) == 6 and shrunk[:3] == sharded[:3]
    assert max(abs(a - b) for a, b in zip(shrunk, sharded)) < 1e-4, (shrunk, sharded)
    assert (tmp_path / "shrunk" / "final" / "model.safetensors").is_file()
    grown = train_losses(tmp_path / "grown")  # and a one-process checkpoint continued by two
    assert len(grown) == 6 and max(abs(a - b) for a, b in zip(grown, sharded)) < 1e-4, (grown, sharded)

    # bf16 parameters for compute, fp32 shards and reduction: close to one process under bf16 autocast
    train(small_config(byte_data, *STEPS, "train.dtype=bf16", "train.max_steps=2", "train.eval_every=0"),
          tmp_path / "single_bf16")
    mixed, autocast = train_losses(tmp_path / "bf16"), train_losses(tmp_path / "single_bf16")
    assert len(mixed) == 2 and max(abs(a - b) for a, b in zip(mixed, autocast)) < 2e-2, (mixed, autocast)


@pytest.mark.slow
def test_fsdp_fine_tunes_from_a_model_directory_like_one_process(tmp_path):
    """SFT from --init (loaded whole, then sharded) on two processes: the losses of one process with both
    micro-batches, and a consolidated final model."""
    base, data = make_base_and_data(tmp_path, conversations(40), val_fraction=0.2)
    overrides = SFT_SMALL + ["train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=2", *FSDP]
    script = tmp_path / "fsdp_sft.py"
    script.write_text(textwrap.dedent(f"""
        from commonlm.train.trainer import train
        from commonlm.tune.sft import sft_config
        train(sft_config({str(base)!r}, {str(data)!r}, {overrides!r}), {str(tmp_path / "fsdp")!r}, init={str(base)!r})
    """))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = sft_config(str(base), str(data), overrides + ["train.micro_batch_size=4"])
    result = train(single, tmp_path / "single", init=base)
    sharded, one = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "single")
    assert len(sharded) == len(one) == 4
    assert max(abs(a - b) for a, b in zip(sharded, one)) < 1e-4, (sharded, one)
    final, _, _ = load_model_dir(tmp_path / "fsdp" / "final")
    for key, value in result.model.state_dict().items():
        assert torch.allclose(final.state_dict()[key], value, atol=1e-4), key


def test_one_process_fsdp_checkpoint_is_sharded_and_resumes_exactly(byte_data, tmp_path):
    """train.parallel=fsdp in one process trains as ever but checkpoints with DCP, so that the run can later
    continue on several processes; resuming it here continues value for value."""
    steps = [*STEPS, *FSDP, "train.eval_every=0"]
    train(small_config(byte_data, *steps), tmp_path / "full")
    train(small_config(byte_data, *steps), tmp_path / "part", stop_at_step=3)
    assert (latest_checkpoint(tmp_path / "part") / SHARDED / ".metadata").is_file()
    train(resume_config(tmp_path / "part"), tmp_path / "part", resume=True)
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")


def test_a_ddp_checkpoint_continues_under_fsdp_in_one_process_and_a_damaged_one_says_so(byte_data, tmp_path):
    train(small_config(byte_data, *STEPS, "train.eval_every=0"), tmp_path / "run", stop_at_step=3)
    assert (latest_checkpoint(tmp_path / "run") / "optimizer.pt").is_file()
    config = resume_config(tmp_path / "run")
    config.train.parallel = "fsdp"
    # one process: fsdp's checkpoints are sharded, but a ddp checkpoint still loads (nothing is sharded)
    train(config, tmp_path / "run", resume=True, stop_at_step=4)
    assert (latest_checkpoint(tmp_path / "run") / SHARDED).is_dir()
    shutil.rmtree(latest_checkpoint(tmp_path / "run") / SHARDED / ".metadata", ignore_errors=True)
    (latest_checkpoint(tmp_path / "run") / SHARDED / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="damaged"):
        train(resume_config(tmp_path / "run"), tmp_path / "run", resume=True)


@pytest.mark.parametrize("overrides, message", [
    (["train.lora_rank=4"], "LoRA"),
    (["train.objective=grpo", "train.reward=exact"], "GRPO"),
])
def test_fsdp_refuses_what_it_does_not_shard(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("tiny", FSDP + overrides).validate()
