"""Restarts: train.auto_resume continues a run from its newest checkpoint when there is one, so that the same
command line serves the first start and every restart; under torchrun's elastic agent (c10d rendezvous,
--max-restarts) a worker killed mid-run brings the job back from its last checkpoint, losing only the steps
after it."""

import os
import sys
import textwrap

import pytest

from commonlm.errors import UserError
from commonlm.train.checkpoint import latest_checkpoint
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from tests.procs import free_port, run_captured
from tests.train.test_trainer import SMALL, small_config, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["train.max_steps=8", "train.ckpt_every=2", "train.lr=3e-3", "train.eval_every=0"]


def test_auto_resume_starts_a_new_run_and_continues_a_stopped_one_exactly(byte_data, tmp_path):
    config = [*STEPS, "train.auto_resume=true"]
    first = train(small_config(byte_data, *config), tmp_path / "run", stop_at_step=3)  # nothing to resume: starts
    assert first.step == 3 and latest_checkpoint(tmp_path / "run").name == "step_000003"
    again = train(small_config(byte_data, *config), tmp_path / "run")  # the same call again: continues
    full = train(small_config(byte_data, *STEPS), tmp_path / "full")
    assert again.step == full.step == 8
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "full")
    with pytest.raises(UserError, match="already holds a run"):  # without it, a second start is refused as before
        train(small_config(byte_data, *STEPS), tmp_path / "run")


@pytest.mark.slow
def test_a_killed_worker_restarts_the_job_from_its_last_checkpoint(byte_data, tmp_path):
    run = tmp_path / "elastic"
    script = tmp_path / "elastic_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from commonlm.config import load_config
        from commonlm.train.objective import NextToken
        from commonlm.train.trainer import train

        attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
        open({str(tmp_path)!r} + f"/attempt{{attempt}}_rank{{rank}}", "w").close()

        class DiesOnce(NextToken):
            # the first attempt's rank 1 is SIGKILLed (no handler runs, nothing is saved) as it fetches step 6's
            # batch: steps 1-5 are done, the last checkpoint is step 4's
            fetched = 0
            def next_batch(self):
                DiesOnce.fetched += 1
                if attempt == 0 and rank == 1 and DiesOnce.fetched == 6:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().next_batch()

        config = load_config("tiny", {SMALL + STEPS + ["train.auto_resume=true"]!r})
        config.data.path = {str(byte_data)!r}
        train(config, {str(run)!r}, objective=DiesOnce)
    """))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # a new store for each attempt: torchrun's shared one keeps the last attempt's gloo addresses, and the
           # restarted workers connected to those (refused, or hung): pytorch/pytorch#135712
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # the recipe of docs/scale-out.md, on one machine: 1 to 2 nodes, one restart, c10d rendezvous (a short last
    # call: with one node there is nobody else to wait for)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic-test",
           "--rdzv-conf=last_call_timeout=1", str(script)]
    proc = run_captured(cmd, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    assert {p.name for p in tmp_path.glob("attempt*")} == {f"attempt{a}_rank{r}" for a in (0, 1) for r in (0, 1)}
    assert (run / "final" / "model.safetensors").is_file()
    # only step 5 ran in both attempts (lost with the killed worker, done again from step 4's checkpoint), with the
    # same loss both times; step 6 never finished before the kill
    records = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in records]
    assert sorted(steps) == [1, 2, 3, 4, 5, 5, 6, 7, 8], steps
    step5 = [r["loss"] for r in records if r["step"] == 5]
    assert step5[0] == step5[1]
    # and the job as a whole trained like one process with both workers' batch
    train(small_config(byte_data, *STEPS, "train.micro_batch_size=8"), tmp_path / "single")
    elastic = {r["step"]: r["loss"] for r in records}
    assert max(abs(elastic[s] - loss) for s, loss in enumerate(train_losses(tmp_path / "single"), 1)) < 1e-4
