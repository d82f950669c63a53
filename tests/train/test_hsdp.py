"""Hybrid sharding (train.parallel=hsdp, train.shard_size) in four CPU processes under torchrun (gloo on 127.0.0.1):
FSDP2 on a 2-D mesh of 2 replicas x 2 shards trains like DDP (AdamW, and Muon, whose whole-matrix gather crosses
only the shard dimension), and its DCP checkpoint, written by four ranks, continues at two under plain fsdp."""

import shutil
import textwrap

import pytest

from commonlm.config import TrainConfig, load_config
from commonlm.errors import UserError
from commonlm.train.checkpoint import SHARDED, latest_checkpoint
from commonlm.train.parallel import device_mesh
from commonlm.train.trainer import train
from commonlm.world import World
from tests.procs import torchrun
from tests.train.test_trainer import SMALL, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")
# 4 processes x micro-batch 4 x 32 tokens = 512 tokens; 1024 a step: two micro-batches each (at 2 processes: of 8)
STEPS = ["train.max_steps=6", "train.ckpt_every=3", "train.lr=3e-3", "train.tokens_per_step=1024"]
HSDP = ["train.parallel=hsdp", "train.shard_size=2"]


def _script(path, byte_data, body: str):
    path.write_text(textwrap.dedent(f"""
        import sys
        from torch.distributed.tensor import Replicate, Shard
        from commonlm.config import load_config
        from commonlm.train.trainer import resume_config, train

        def config(*extra):
            c = load_config("tiny", {SMALL + STEPS!r} + list(extra))
            c.data.path = {str(byte_data)!r}
            return c
    """) + textwrap.dedent(body))
    return path


@pytest.mark.slow
def test_hsdp_trains_like_ddp_and_its_checkpoint_continues_at_two_processes(byte_data, tmp_path):
    runs = {name: str(tmp_path / name) for name in ("ddp", "hsdp", "split", "ddp_muon", "hsdp_muon")}
    four = _script(tmp_path / "four.py", byte_data, f"""
        runs = {runs!r}
        train(config(), runs["ddp"])
        weight = train(config(*{HSDP!r}), runs["hsdp"]).model.blocks[0].attn.qkv.weight
        assert tuple(weight.device_mesh.shape) == (2, 2) and weight.placements == (Replicate(), Shard(0)), weight
        train(config(*{HSDP!r}), runs["split"], stop_at_step=3)
        train(config("train.optimizer=muon"), runs["ddp_muon"])
        train(config("train.optimizer=muon", *{HSDP!r}), runs["hsdp_muon"])
    """)
    proc = torchrun(four, nproc=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ddp, hsdp = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "hsdp")
    assert len(ddp) == len(hsdp) == 6 and ddp[-1] < ddp[0] - 0.3
    assert max(abs(a - b) / abs(b) for a, b in zip(hsdp, ddp)) < 1e-5, (hsdp, ddp)
    muon, hsdp_muon = train_losses(tmp_path / "ddp_muon"), train_losses(tmp_path / "hsdp_muon")
    assert len(muon) == 6 and max(abs(a - b) / abs(b) for a, b in zip(hsdp_muon, muon)) < 1e-5, (hsdp_muon, muon)
    assert muon != ddp  # (Muon really stepped)

    # four ranks wrote the step-3 checkpoint (DCP keeps one copy of what the replicas hold alike)
    ckpt = latest_checkpoint(tmp_path / "split")
    assert len(list((ckpt / SHARDED).glob("*.distcp"))) == 4 and (ckpt / "model.safetensors").is_file()
    shutil.copytree(tmp_path / "split", tmp_path / "shrunk")
    two = _script(tmp_path / "two.py", byte_data, """
        for run, parallel in ((sys.argv[1], "hsdp"), (sys.argv[2], "fsdp")):
            c = resume_config(run)
            c.train.parallel, c.train.shard_size = parallel, 2 if parallel == "hsdp" else 0
            c.train.micro_batch_size = 8  # (per process: the same 1024 tokens a step)
            train(c, run, resume=True)
    """)
    proc = torchrun(two, tmp_path / "split", tmp_path / "shrunk", nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # at two processes: one shard group of two (hsdp), or fsdp over both; the first three steps are the four
    # processes' own, the rest close to the uninterrupted run's
    for run in ("split", "shrunk"):
        resumed = train_losses(tmp_path / run)
        assert len(resumed) == 6 and resumed[:3] == hsdp[:3], (run, resumed)
        assert max(abs(a - b) / abs(b) for a, b in zip(resumed, hsdp)) < 1e-5, (run, resumed, hsdp)
        assert (tmp_path / run / "final" / "model.safetensors").is_file()


def test_a_shard_size_that_does_not_divide_the_processes_is_a_one_line_error():
    config = load_config("tiny", HSDP[:1] + ["train.shard_size=3"])
    with pytest.raises(UserError, match=r"train.shard_size=3: the 4 processes do not split into groups"):
        device_mesh(config, World(rank=0, size=4), device=None)


@pytest.mark.parametrize("settings, match", [
    ({"parallel": "fsdp", "shard_size": 2}, "is for train.parallel=hsdp"),
    ({"parallel": "hsdp", "shard_size": -1}, "must be >= 0"),
])
def test_bad_shard_settings_are_one_line_errors(settings, match):
    with pytest.raises(UserError, match=match):
        TrainConfig(**settings).validate()


def test_hsdp_in_one_process_checkpoints_with_dcp(byte_data, tmp_path):
    config = load_config("tiny", SMALL + STEPS[:2] + HSDP)
    config.data.path = str(byte_data)
    train(config, tmp_path / "one")
    assert (latest_checkpoint(tmp_path / "one") / SHARDED / ".metadata").is_file()
