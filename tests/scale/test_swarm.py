"""Decentralized DiLoCo volunteers (scale/swarm.py) with a lighthouse (scale/lighthouse.py), as real processes.

torchft's manager binds every interface, so the processes run inside `unshare -n`: a fresh network namespace
with only a loopback device, which nothing outside can reach. Each test is one bash script that starts the
lighthouse and the volunteers there (every process under `timeout`), and stops by itself.
"""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonlm.config import load_config
from commonlm.data.prepare import prepare
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.modeldir import load_model_dir
from commonlm.train.metrics import read_metrics
from commonlm.train.parallel import build_model, init_weights
from commonlm.train.trainer import resolve_vocab, train
from tests.conftest import synthetic_corpus
from tests.procs import run_captured

SMALL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=32", "train.micro_batch_size=4",
         "train.dtype=fp32", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=3", "train.threads=1",
         "train.lr=3e-3", "train.swarm_sync_every=3", "train.ckpt_every=3"]
PER_PROCESS_S = 240  # the `timeout` of each process in a script (only a hung one gets there)


def _namespace_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not _namespace_works(), reason="needs `unshare -n` (root, or user namespaces) "
                                     "and iproute2: torchft binds every interface, so its tests run in a private "
                                     "network namespace")


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> list[Path]:
    """Three volunteers' own data: different documents, one byte tokenizer."""
    root = tmp_path_factory.mktemp("swarmdata")
    Tokenizer.byte_level().save(root / "tok")
    dirs = []
    for i in range(3):
        corpus = synthetic_corpus(root / f"corpus{i}", n_docs=30, seed=100 + i)
        prepare([str(corpus)], root / "tok", root / f"data{i}", val_fraction=0.1, workers=1, progress=False)
        dirs.append(root / f"data{i}")
    return dirs


def _config(data: Path, *overrides: str):
    config = load_config("tiny", SMALL + list(overrides))
    config.data.path = str(data)
    return config


def _volunteer(data: Path, out: Path, max_steps: int, *overrides: str) -> str:
    """The shell command of one volunteer, in the background; its pid lands in $!."""
    cmd = [sys.executable, "-m", "commonlm", "train", "--config", "tiny", "--data", data, "--out", out,
           "--swarm", "127.0.0.1:29510", "--set", *SMALL, f"train.max_steps={max_steps}", *overrides]
    return f"timeout {PER_PROCESS_S} {shlex.join(map(str, cmd))} > {out}.log 2>&1 &"


def _run_in_namespace(tmp_path: Path, min_replicas: int, body: str) -> str:
    """Start a lighthouse, run `body` (which starts the volunteers and waits for them), stop the lighthouse."""
    lighthouse = [sys.executable, "-m", "commonlm", "swarm", "lighthouse", "--bind", "127.0.0.1:29510",
                  "--min-replicas", str(min_replicas), "--join-timeout-ms", "5000", "--heartbeat-timeout-ms", "2000"]
    script = tmp_path / "swarm.sh"
    script.write_text("\n".join([
        "set -u", "ip link set lo up", "export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1",
        # (--foreground: without it `timeout` passes our TERM on twice, to the lighthouse and to its group, and
        # the second can land after the lighthouse restored the default handler on its way out: exit 143)
        f"timeout --foreground {PER_PROCESS_S} {shlex.join(lighthouse)} > {tmp_path}/lighthouse.log 2>&1 &", "LH=$!",
        body, "kill -TERM $LH; wait $LH; echo lighthouse exit $?"]))
    proc = run_captured(["unshare", "-n", "bash", str(script)])
    assert proc.returncode == 0 and "lighthouse exit 0" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else f"(no {path})"


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_model_dir(directory)
    return model.state_dict()


def _syncs(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "swarm_sync" in r]


@pytest.mark.slow
@needs_namespace
@pytest.mark.parametrize("compress", ["none", "bf16"])
def test_two_volunteers_hold_the_same_global_weights_after_each_outer_step(local_data, tmp_path, compress):
    a, b = _two_volunteers(local_data, tmp_path, 6, f"train.swarm_compress={compress}")

    for run in (a, b):
        syncs = _syncs(run)
        assert [(r["step"], r["swarm_sync"], r["swarm_committed"], r["swarm_volunteers"]) for r in syncs] == [
            (3, 1, True, 2), (6, 2, True, 2)]
        payload = syncs[0]["swarm_payload_bytes"]
        bytes_per_value = 2 if compress == "bf16" else 4
        assert payload == bytes_per_value * sum(p.numel() for p in load_model_dir(run / "final")[0].parameters())
        assert syncs[-1]["swarm_sent_total"] == 2 * payload  # two syncs, 2(n-1)/n of it each with n = 2
    assert _syncs(a)[0]["swarm_payload_bytes"] == _syncs(b)[0]["swarm_payload_bytes"]

    # after each sync (checkpoints at steps 3 and 6) both volunteers hold the same global weights
    _assert_same_weights(a, b, "checkpoints/step_000003", "checkpoints/step_000006", "final")

    # ... and they are the outer Nesterov step on the averaged pseudo-gradients
    start, local = _start_and_alone(local_data, tmp_path)
    start_weights = start.state_dict()
    global_1 = _weights(a / "checkpoints/step_000003")
    lr, momentum = 0.7, 0.9  # the defaults; the first Nesterov step moves by lr * (1 + momentum) * g
    for key, w0 in start_weights.items():
        pseudo_gradients = (w0 - local[0][key], w0 - local[1][key])
        expected = w0 - lr * (1 + momentum) * (pseudo_gradients[0] + pseudo_gradients[1]) / 2
        # bf16: each pseudo-gradient rounded once, their sum once more (a relative 2^-8 each), times the step
        rounding = lr * (1 + momentum) * (pseudo_gradients[0].abs() + pseudo_gradients[1].abs()) * 2 ** -8
        allowed = 1e-6 + (rounding if compress == "bf16" else 0)
        assert ((global_1[key] - expected).abs() <= allowed).all(), key
        if compress == "bf16":  # (and the rounding did happen: not the fp32 result)
            assert not torch.equal(global_1[key], expected) or pseudo_gradients[0].abs().max() == 0, key


def _two_volunteers(local_data, tmp_path: Path, max_steps: int, *settings: str) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    out = _run_in_namespace(tmp_path, 2, "\n".join([
        _volunteer(local_data[0], a, max_steps, *settings), "A=$!",
        _volunteer(local_data[1], b, max_steps, *settings), "B=$!",
        "wait $A; echo a exit $?", "wait $B; echo b exit $?"]))
    assert "a exit 0" in out and "b exit 0" in out, out + _log_tail(Path(f"{a}.log")) + _log_tail(Path(f"{b}.log"))
    return a, b


def _assert_same_weights(a: Path, b: Path, *step_dirs: str) -> None:
    for step_dir in step_dirs:
        wa, wb = _weights(a / step_dir), _weights(b / step_dir)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), step_dir


def _start_and_alone(local_data, tmp_path: Path) -> tuple[torch.nn.Module, list[dict]]:
    """The volunteers' common initial model, and each one's weights after its own first 3 inner steps: the same run
    without the swarm, stopped there."""
    local = []
    for i, data in enumerate(local_data[:2]):
        alone = train(_config(data, "train.max_steps=6"), tmp_path / f"alone{i}", stop_at_step=3)
        local.append(_weights(alone.run_dir / "checkpoints/step_000003"))
    config = _config(local_data[0])
    resolve_vocab(config, Tokenizer.load(local_data[0]))
    start = build_model(config, meta=True)
    init_weights(start, config.train.seed, torch.device("cpu"))
    return start, local


@pytest.mark.slow
@needs_namespace
@pytest.mark.parametrize("compress", ["int8", "topk"])
def test_int8_and_topk_volunteers_hold_the_same_weights_and_their_first_step_is_the_compressed_average(
        local_data, tmp_path, compress):
    from commonlm.scale.compress import BLOCK, dequantize_int8, quantize_int8, top_k

    a, b = _two_volunteers(local_data, tmp_path, 9, f"train.swarm_compress={compress}", "train.swarm_topk=0.05")
    _assert_same_weights(a, b, "checkpoints/step_000003", "checkpoints/step_000006", "checkpoints/step_000009",
                         "final")
    start, local = _start_and_alone(local_data, tmp_path)
    names = [name for name, _ in start.named_parameters()]  # (what DiLoCo sends, in its order; a tied weight once)
    sizes = [p.numel() for _, p in start.named_parameters()]
    w0 = start.state_dict()
    pseudo_gradients = [torch.cat([(w0[k] - weights[k]).flatten() for k in names]) for weights in local]
    if compress == "int8":  # each volunteer's blocks of 256 in int8, averaged, the average in int8 again
        padded = [torch.nn.functional.pad(g, (0, -g.numel() % (2 * BLOCK))) for g in pseudo_gradients]
        average = sum(dequantize_int8(*quantize_int8(g)) for g in padded) / 2
        average = dequantize_int8(*quantize_int8(average))[:sum(sizes)]
        payload = padded[0].numel() * (1 + 4 / BLOCK)  # int8 values and an fp32 scale per block
    else:  # each parameter's 5% largest entries, as bf16, summed densely and halved
        average = torch.zeros(sum(sizes))
        for g in pseudo_gradients:
            for part, offset in zip(g.split(sizes), [sum(sizes[:i]) for i in range(len(sizes))], strict=True):
                chosen = top_k(part, 0.05)
                average[chosen + offset] += part[chosen].to(torch.bfloat16).float()
        average /= 2
        payload = 6 * sum(-(-size * 5 // 100) for size in sizes)  # int32 position and bf16 value per entry
    true_average = (pseudo_gradients[0] + pseudo_gradients[1]) / 2
    assert not torch.allclose(average, true_average, atol=1e-7)  # (it is compressed)
    step = 0.7 * (1 + 0.9)  # the outer optimizer's first Nesterov step: lr * (1 + momentum) * g
    global_1 = _weights(a / "checkpoints/step_000003")
    moved = torch.cat([(w0[k] - global_1[k]).flatten() for k in names])
    assert torch.allclose(moved, step * average, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(moved, step * true_average, rtol=1e-4, atol=1e-6)  # (and not the uncompressed one)

    for run in (a, b):
        syncs = _syncs(run)
        assert [(r["step"], r["swarm_committed"], r["swarm_volunteers"]) for r in syncs] == [
            (3, True, 2), (6, True, 2), (9, True, 2)]
        assert all(r["swarm_payload_bytes"] == payload == r["swarm_sent_bytes"] for r in syncs)  # 2(n-1)/n = 1
        losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
        assert len(losses) == 9 and sum(losses[-3:]) < sum(losses[:3])  # it learns


@pytest.mark.slow
@needs_namespace
@pytest.mark.parametrize("max_steps", [8, 9])
def test_streaming_fragments_are_synced_in_turn_and_the_run_ends_with_one_global_model(local_data, tmp_path,
                                                                                      max_steps):
    # H = 4 in 2 fragments (embedding + block 0; block 1 + final norm): one fragment synced every 2 steps, in turn;
    # after the last step the fragments that trained on since their own sync are synced once more: at 8 steps
    # fragment 0 (fragment 1 was synced at step 8), at 9 both
    a, b = _two_volunteers(local_data, tmp_path, max_steps, "train.swarm_sync_every=4", "train.swarm_fragments=2",
                           "train.ckpt_every=2", "train.keep_last=5", "train.swarm_compress=int8")
    # the final models are one global model: every tensor the same on both volunteers
    final_a, final_b = _weights(a / "final"), _weights(b / "final")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    parameters = dict(load_model_dir(a / "final")[0].named_parameters())  # (a tied weight once)
    second = [name for name in parameters if name.startswith("blocks.1.") or name == "norm.weight"]
    fragments = [[name for name in parameters if name not in second], second]
    sizes = [sum(parameters[name].numel() for name in names) for names in fragments]
    end_syncs = [(max_steps, 5, 0, True)] + ([(max_steps, 6, 1, True)] if max_steps == 9 else [])
    for run in (a, b):
        syncs = _syncs(run)
        assert [(r["step"], r["swarm_sync"], r["swarm_fragment"], r["swarm_committed"]) for r in syncs] == [
            (2, 1, 0, True), (4, 2, 1, True), (6, 3, 0, True), (8, 4, 1, True)] + end_syncs
        assert [r.get("swarm_end", False) for r in syncs] == [False] * 4 + [True] * len(end_syncs)
        # bytes per sync are the fragment's: int8 blocks of 256 and their scales, padded for 2 volunteers
        assert [r["swarm_payload_bytes"] for r in syncs] == [
            -(-size // 512) * 512 * (1 + 4 / 256) for size in sizes * 3][:len(syncs)]
    for step, synced in [(2, 0), (4, 1), (6, 0), (8, 1)]:
        wa, wb = (_weights(run / f"checkpoints/step_{step:06d}") for run in (a, b))
        assert all(torch.equal(wa[name], wb[name]) for name in fragments[synced]), step
        # the other fragment trained on locally since its own sync (its global weights differ only in its steps)
        assert not all(torch.equal(wa[name], wb[name]) for name in fragments[1 - synced]), step

    # the end syncs moved the fragments that were local at the last step (the checkpoint there), and only those;
    # by an outer step (not back to their global weights of their last sync: the checkpoint of that step)
    last = _weights(a / f"checkpoints/step_{max_steps:06d}")
    moved = {0: 6, 1: 8} if max_steps == 9 else {0: 6}
    for index, names in enumerate(fragments):
        unchanged = [torch.equal(final_a[name], last[name]) for name in names]
        assert (not all(unchanged)) if index in moved else all(unchanged), index
        if index in moved:
            synced = _weights(a / f"checkpoints/step_{moved[index]:06d}")
            assert not all(torch.equal(final_a[name], synced[name]) for name in names), index


@pytest.mark.slow
@needs_namespace
def test_an_end_sync_without_a_quorum_leaves_every_fragment_at_its_last_global_weights(local_data, tmp_path):
    # B runs 6 steps, A 8: B's end sync (fragment 1) pairs with A's own sync of fragment 1 at step 8, then B is gone
    # and A's end sync (fragment 0) finds no quorum within its timeout; A goes back to fragment 0's global weights of
    # step 6, so both final models are still the same global one
    a, b = tmp_path / "a", tmp_path / "b"
    fragmented = ["train.swarm_sync_every=4", "train.swarm_fragments=2", "train.ckpt_every=2", "train.keep_last=4"]
    out = _run_in_namespace(tmp_path, 2, "\n".join([
        _volunteer(local_data[0], a, 8, *fragmented, "train.swarm_quorum_timeout=20"), "A=$!",
        _volunteer(local_data[1], b, 6, *fragmented), "B=$!", "wait $A; echo a exit $?", "wait $B; echo b exit $?"]))
    assert "a exit 0" in out and "b exit 0" in out, out + _log_tail(Path(f"{a}.log")) + _log_tail(Path(f"{b}.log"))

    final_a, final_b = _weights(a / "final"), _weights(b / "final")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    syncs = [(r["step"], r["swarm_sync"], r["swarm_fragment"], r["swarm_committed"], r.get("swarm_end", False))
             for r in _syncs(b)]
    assert syncs == [(2, 1, 0, True, False), (4, 2, 1, True, False), (6, 3, 0, True, False), (6, 4, 1, True, True)]
    syncs = [(r["step"], r["swarm_sync"], r["swarm_fragment"], r["swarm_committed"]) for r in _syncs(a)]
    assert syncs == [(2, 1, 0, True), (4, 2, 1, True), (6, 3, 0, True), (8, 4, 1, True)]
    failed = [r for r in read_metrics(a) if "swarm_end_failed" in r]
    assert len(failed) == 1 and failed[0]["step"] == 8 and "no quorum" in failed[0]["swarm_end_failed"]
    # fragment 0 is A's global weights of its sync at step 6 again, not its local weights of step 8
    parameters = dict(load_model_dir(a / "final")[0].named_parameters())
    first = [name for name in parameters if not name.startswith("blocks.1.") and name != "norm.weight"]
    global_6, local_8 = _weights(a / "checkpoints/step_000006"), _weights(a / "checkpoints/step_000008")
    assert all(torch.equal(final_a[name], global_6[name]) for name in first)
    assert not all(torch.equal(final_a[name], local_8[name]) for name in first)


@pytest.mark.slow
@needs_namespace
def test_a_leaver_does_not_stop_the_others_and_a_late_joiner_heals_from_a_peer(local_data, tmp_path):
    # A trains 3 outer rounds; B leaves after the first; C starts only after B is gone, so A's second sync waits
    # for C (a quorum needs 2), and C, behind by one sync, fetches A's state and syncs with it from then on
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    out = _run_in_namespace(tmp_path, 2, "\n".join([
        _volunteer(local_data[0], a, 9), "A=$!", _volunteer(local_data[1], b, 3), "B=$!",
        "wait $B; echo b exit $?", _volunteer(local_data[2], c, 6), "C=$!",
        "wait $C; echo c exit $?", "wait $A; echo a exit $?"]))
    logs = "".join(_log_tail(Path(f"{run}.log")) for run in (a, b, c))
    assert "a exit 0" in out and "b exit 0" in out and "c exit 0" in out, out + logs

    assert [(r["swarm_sync"], r["swarm_volunteers"]) for r in _syncs(a)] == [(1, 2), (2, 2), (3, 2)], logs
    assert [(r["step"], r["swarm_sync"]) for r in _syncs(b)] == [(3, 1)]
    # C's first sync is the group's second: it healed (took the peer's count, weights and optimizers) and joined it
    assert [(r["step"], r["swarm_sync"], r["swarm_committed"]) for r in _syncs(c)] == [(3, 2, True), (6, 3, True)]
    wa, wc = _weights(a / "final"), _weights(c / "final")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    wa2, wc1 = _weights(a / "checkpoints/step_000006"), _weights(c / "checkpoints/step_000003")
    assert all(torch.equal(wa2[k], wc1[k]) for k in wa2)


def test_bf16_pseudo_gradients_round_trip_within_bf16_and_error_feedback_carries_the_remainder():
    from torchft.work import _DummyWork  # an all-reduce over one volunteer: the tensor as it is

    from commonlm.scale.compress import Bf16WithErrorFeedback, Calls

    sent_shapes = []

    class Alone:  # torchft's Manager as the compressor sees it: one volunteer, every sync applied
        step = 0

        def current_step(self) -> int:
            return self.step

        def num_participants(self) -> int:
            return 1

        def allreduce(self, tensor, should_quantize=False):
            sent_shapes.append((tensor.dtype, tuple(tensor.shape)))
            return _DummyWork(tensor)

    generator = torch.Generator().manual_seed(0)
    manager = Alone()
    compress = Bf16WithErrorFeedback(manager, manager.allreduce, Calls(manager, [2]))
    truth = [torch.zeros(300), torch.zeros(7, 5)]
    received = [torch.zeros(300), torch.zeros(7, 5)]
    for sync in range(20):
        for i, shape in enumerate([(300,), (7, 5)]):
            pseudo_gradient = torch.randn(shape, generator=generator) * (1 + 1e-3 * sync)
            tensor = pseudo_gradient.clone()
            compress(tensor).wait()
            # one sync: within one bf16 rounding of what was to be sent (this gradient plus the carried remainder)
            assert torch.allclose(tensor, pseudo_gradient, rtol=2 ** -7, atol=2 ** -7)
            truth[i] += pseudo_gradient
            received[i] += tensor
        compress.remainders.settle(True)
        manager.step += 1
    assert sent_shapes[:2] == [(torch.bfloat16, (300,)), (torch.bfloat16, (7, 5))]
    for i in range(2):
        # over 20 syncs the rounding errors do not add up: what arrived is the truth less the last remainder only
        assert torch.allclose(received[i] + compress.remainders.kept[(0, i)], truth[i], atol=1e-5)


def test_norm_clip_holds_a_sync_back_until_it_has_it_all_then_scales_it_to_k_times_the_median():
    from torchft.work import _DummyWork  # an all-reduce over one volunteer: the tensor as it is

    from commonlm.scale.compress import Bf16WithErrorFeedback, Calls
    from commonlm.scale.swarm import _NormClip

    class Quorum:  # torchft's Manager as the clip sees it, in a quorum of 3 where the others' updates have norms 1, 2
        def __init__(self) -> None:
            self.sent: list[torch.Tensor] = []

        def num_participants(self) -> int:
            return 3

        def current_step(self) -> int:
            return 0

        def participating_rank(self) -> int:
            return 0

        def allreduce(self, tensor, should_quantize=False, reduce_op=None):
            if tensor.shape == (3,):  # the norms: a sum of one slot each
                tensor += torch.tensor([0.0, 1.0, 2.0])
            else:
                self.sent.append(tensor.clone())
            return _DummyWork(tensor)

    quorum = Quorum()
    clip = _NormClip(quorum, Calls(quorum, [2]), max_ratio=3)
    # (clipped, then compressed, as in a volunteer)
    clip.send = Bf16WithErrorFeedback(quorum, quorum.allreduce, Calls(quorum, [2]))
    update = [torch.full((4,), 10.0), torch.full((3, 3), 10.0)]  # norm 10 * sqrt(13), far over 3 x the median 2
    works = [clip(update[0].clone())]
    assert quorum.sent == []  # nothing goes out before the sync's last tensor: the norm needs all of them
    works.append(clip(update[1].clone()))
    for work in works:
        work.wait()
    norm = 10 * 13 ** 0.5
    assert clip.norms == pytest.approx([norm, 1.0, 2.0]) and clip.median == 2.0
    assert clip.scale == pytest.approx(6 / norm)
    sent_norm = torch.sqrt(sum(t.float().pow(2).sum() for t in quorum.sent))
    assert sent_norm == pytest.approx(6.0, rel=2 ** -7)  # k x the median, within bf16
    assert [t.dtype for t in quorum.sent] == [torch.bfloat16] * 2

    honest = [torch.full((4,), 0.5), torch.full((3, 3), 0.5)]  # norm 1.8: under 3 x 2, sent as it is
    for work in [clip(t) for t in honest]:
        work.wait()
    assert clip.scale == 1.0 and clip.norms[0] == pytest.approx(0.5 * 13 ** 0.5)


def test_fragments_are_whole_blocks_in_order_holding_the_models_own_parameters():
    from commonlm.model.decoder import Decoder
    from commonlm.scale.swarm import _fragments

    model = Decoder(load_config("tiny", ["model.vocab_size=320", "model.n_layer=4"]).model)
    assert _fragments(model, 1) == [model]
    fragments = _fragments(model, 2)
    owned = [[name.replace("/", ".") for name, _ in fragment.named_parameters()] for fragment in fragments]
    assert owned[0] == [name for name, _ in model.named_parameters()][:1 + 2 * 6]  # embedding (tied head), blocks 0-1
    assert all(name.startswith(("blocks.2.", "blocks.3.")) for name in owned[1][:-1]) and owned[1][-1] == "norm.weight"
    parameters = dict(model.named_parameters())
    assert all(p is parameters[name.replace("/", ".")] for f in fragments for name, p in f.named_parameters())
    with pytest.raises(UserError, match="train.swarm_fragments=5: the model has 4 blocks"):
        _fragments(model, 5)


def test_swarm_settings_are_checked():
    for override, key in [("train.swarm_sync_every=0", "train.swarm_sync_every"),
                          ("train.swarm_outer_momentum=1", "train.swarm_outer_momentum"),
                          ("train.swarm_outer_lr=0", "train.swarm_outer_lr"),
                          ("train.swarm_port=70000", "train.swarm_port"),
                          ("train.swarm=nowhere", "train.swarm"),
                          ("train.swarm_compress=fp8", "swarm_compress"),
                          ("train.swarm_topk=0", "train.swarm_topk"),
                          ("train.swarm_topk=1.5", "train.swarm_topk"),
                          ("train.swarm_fragments=0", "train.swarm_fragments"),
                          ("train.swarm_fragments=3", "train.swarm_fragments"),  # (H = 100 is not a multiple of 3)
                          ("train.swarm_max_norm_ratio=0.5", "train.swarm_max_norm_ratio")]:
        with pytest.raises(UserError, match=key):
            load_config("tiny", ["train.swarm=127.0.0.1:29510", override]).validate()
    load_config("tiny", ["train.swarm=[::1]:29510"]).validate()
    load_config("tiny", ["train.swarm_sync_every=0"]).validate()  # (ignored without train.swarm)


def test_bad_swarm_address_and_bind_are_one_line_errors(byte_data, tmp_path):
    proc = run_captured([sys.executable, "-m", "commonlm", "train", "--config", "tiny", "--data", byte_data,
                         "--out", tmp_path / "run", "--set", *SMALL, "--swarm", "nowhere"])
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "train.swarm='nowhere' must be the lighthouse's HOST:PORT" in said, said
    assert "Traceback" not in said
    proc = run_captured([sys.executable, "-m", "commonlm", "swarm", "lighthouse", "--bind", "29510"])
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "must be HOST:PORT" in said and "Traceback" not in said, said


@pytest.mark.slow
@needs_namespace
def test_a_volunteer_with_a_huge_update_is_clipped_to_k_times_the_median(local_data, tmp_path):
    # B is a bad volunteer: a learning rate 100x A's, so its update is far larger; with k = 2 it is scaled down to
    # twice the median of the two norms (the lower one: A's) before the average, and A's is sent as it is
    a, b = tmp_path / "a", tmp_path / "b"
    defence, bad_lr = "train.swarm_max_norm_ratio=2", "train.lr=0.3"
    out = _run_in_namespace(tmp_path, 2, "\n".join([
        _volunteer(local_data[0], a, 3, defence), "A=$!", _volunteer(local_data[1], b, 3, defence, bad_lr), "B=$!",
        "wait $A; echo a exit $?", "wait $B; echo b exit $?"]))
    assert "a exit 0" in out and "b exit 0" in out, out + _log_tail(Path(f"{a}.log")) + _log_tail(Path(f"{b}.log"))

    config = _config(local_data[0])
    resolve_vocab(config, Tokenizer.load(local_data[0]))
    start = build_model(config, meta=True)
    init_weights(start, config.train.seed, torch.device("cpu"))
    w0 = start.state_dict()
    updates = []  # each volunteer's pseudo-gradient: its own 3 inner steps without the swarm
    for i, (data, lr) in enumerate([(local_data[0], "train.lr=3e-3"), (local_data[1], bad_lr)]):
        alone = _weights(train(_config(data, "train.max_steps=3", lr), tmp_path / f"alone{i}").run_dir / "final")
        updates.append({k: w0[k] - alone[k] for k in w0})
    parameters = [name for name, _ in start.named_parameters()]  # (a tied weight once, as DiLoCo sends it)
    norms = [float(torch.sqrt(sum(u[k].double().pow(2).sum() for k in parameters))) for u in updates]
    assert norms[1] > 10 * norms[0]

    sync_a, sync_b = _syncs(a)[0], _syncs(b)[0]
    for sync in (sync_a, sync_b):
        assert sync["swarm_committed"] and sync["swarm_volunteers"] == 2
        assert sorted(sync["swarm_norms"]) == pytest.approx(sorted(norms), rel=1e-4)
    assert sync_a["swarm_update_scale"] == 1.0
    scale = 2 * norms[0] / norms[1]
    assert sync_b["swarm_update_scale"] == pytest.approx(scale, rel=1e-4)

    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    step = 0.7 * (1 + 0.9)  # the first Nesterov step of the outer optimizer's defaults
    moved, undefended = 0.0, 0.0
    for key in parameters:
        expected = w0[key] - step * (updates[0][key] + scale * updates[1][key]) / 2
        assert torch.allclose(wa[key], expected, atol=1e-5), key
        moved += float((wa[key] - w0[key]).double().pow(2).sum())
        undefended += float((step * (updates[0][key] + updates[1][key]) / 2).double().pow(2).sum())
    # the global weights moved by at most (1 + k) / 2 honest updates' worth of the outer step, not by the bad one
    assert moved ** 0.5 <= step * (1 + 2) / 2 * norms[0] * 1.001 < undefended ** 0.5 / 5
