"""GRPO through the one loop: advantages and the clipped loss are TRL's formulas, the loop's normalisation gives
TRL's "dapo" loss and means over completions for the reward metrics, rollouts are seeded (resume is exact),
a raising reward does not stop the run, and GRPO raises the reward of a model SFT left weak on arithmetic."""

import math
import textwrap

import pytest
import torch

from commonlm.data.arithmetic import problems, prompt_records, sft_records
from commonlm.data.prompts import PromptData, prepare_prompts
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.loss import IGNORE
from commonlm.modeldir import load_model_dir
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import resume_config, train
from commonlm.tune.grpo import GRPO, clipped_loss, group_advantages, grpo_config, kl_k3, token_logps
from commonlm.tune.rewards import gsm8k
from commonlm.tune.sft import sft_config
from commonlm.utils import write_jsonl
from commonlm.world import World
from tests.procs import torchrun
from tests.tune.conftest import base_and_data

from .test_sft import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")
GRPO_SMALL = ["train.dtype=fp32", "train.threads=1", "train.log_every=1", "train.warmup_steps=2",
              "train.reward=gsm8k", "train.grpo_max_new_tokens=6", "train.micro_batch_size=8",
              "train.schedule=constant", "train.lr=5e-4", "train.eval_every=0"]


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory):
    """(model directory, prompts data): a tiny model that 150 SFT steps taught single-digit sums only partly
    (its sampled completions are right about a fifth of the time), and 1-digit sum prompts."""
    root = tmp_path_factory.mktemp("grpo")
    base, chat = base_and_data(root, sft_records(problems(400, seed=1, digits=1)), val_fraction=0.1)
    config = sft_config(str(base), str(chat), SMALL + ["train.max_steps=150", "train.micro_batch_size=16",
                                                       "train.eval_every=0", "train.log_every=50"])
    train(config, root / "sft", init=base)
    path = write_jsonl(root / "prompts.jsonl", prompt_records(problems(300, seed=2, digits=1)))
    prepare_prompts([str(path)], base, root / "prompts", val_fraction=0.2)
    return root / "sft" / "final", root / "prompts"


def objective(model_dir, prompts, *overrides) -> GRPO:
    model, _, _ = load_model_dir(model_dir)
    config = grpo_config(str(model_dir), str(prompts), GRPO_SMALL + list(overrides))
    return GRPO(config, World(), torch.device("cpu"), torch.float32, model=model.train())


def sampled_reward(model_dir, prompts) -> float:
    """The mean reward of 8 sampled completions of every training prompt (fixed seeds)."""
    grpo = objective(model_dir, prompts)
    ps = grpo.train_prompts
    completions = grpo._sample(ps, 8, 1.0, list(range(8 * len(ps))))
    answers = [p.answer for p in ps for _ in range(8)]
    return sum(gsm8k(c.text, answer) for c, answer in zip(completions, answers)) / len(completions)


def test_advantages_are_the_reference_check_value():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert torch.allclose(adv, torch.tensor([[1, -1, -1, 1]]) * 0.865875, atol=1e-6)  # wave2-references.md
    assert torch.equal(group_advantages(torch.ones(1, 8)), torch.zeros(1, 8))  # no spread: no signal


def test_clipped_loss_and_kl_are_the_formulas():
    torch.manual_seed(0)
    logp, old, ref = (-torch.rand(64, dtype=torch.float64) * 3 for _ in range(3))
    adv = torch.randn(64, dtype=torch.float64)
    eps = 0.2
    loss, clipped = clipped_loss(logp, old, adv, eps)
    for i in range(64):
        rho = math.exp(logp[i].item() - old[i].item())
        a = adv[i].item()
        want = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        assert abs(loss[i].item() - want) < 1e-9
        assert clipped[i].item() == ((rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0))
        d = ref[i].item() - logp[i].item()
        assert abs(kl_k3(logp, ref)[i].item() - (math.exp(d) - d - 1)) < 1e-9
    assert 0 < clipped.sum() < 64  # both cases occur


def test_loss_is_dapo_and_metrics_are_means_over_completions(weak_model):
    model_dir, prompts = weak_model
    grpo = objective(model_dir, prompts, "train.micro_batch_size=3", "train.grpo_group_size=4")
    batch = grpo.next_batch()
    model = grpo.model
    assert model.training  # the rollout put the model back in train mode
    tok = Tokenizer.load(prompts)
    mask = batch.y != IGNORE
    assert batch.x.shape[0] == 12 and grpo.targets(batch).item() == mask.sum().item()
    texts = [tok.decode(batch.y[r][mask[r]].tolist()) for r in range(12)]
    order = grpo._order(0)[:3]  # the prompts drawn: the first 3 of the run's order
    answers = [grpo.train_prompts[i].answer for i in order for _ in range(4)]
    rewards = [gsm8k(t.replace("<|im_end|>", ""), a) for t, a in zip(texts, answers)]

    loss, metrics = grpo.loss(model, batch)
    loss.backward()
    grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n = mask.sum()
    assert abs(metrics["reward"].item() / n - sum(rewards) / 12) < 1e-6
    assert abs(metrics["completion_length"].item() / n - n.item() / 12) < 1e-6
    assert metrics["clip_fraction"].item() == 0  # one update per rollout: the ratio is 1
    # TRL's dapo at ratio 1: -(sum over tokens of A) / tokens; its gradient, the policy gradient
    adv = group_advantages(torch.tensor(rewards).view(3, 4)).flatten()
    assert torch.allclose(batch.advantages, adv)
    logits, _ = model(batch.x)
    logp = token_logps(logits, batch.y, 1.0)
    assert abs(loss.item() / n - (-(adv[:, None] * mask).sum() / n).item()) < 1e-5
    (-(adv[:, None] * logp).sum()).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grad, model.parameters()))


def test_rollouts_are_seeded_by_position(weak_model):
    model_dir, prompts = weak_model
    a, b = objective(model_dir, prompts), objective(model_dir, prompts)
    first = a.next_batch()
    assert torch.equal(first.x, b.next_batch().x)
    state = a.state_dict()
    second = a.next_batch()
    assert not torch.equal(first.x, second.x)
    c = objective(model_dir, prompts)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch().x, second.x)


def test_rollouts_and_loss_under_bf16_autocast(weak_model):
    """train.dtype=auto is bf16 on a CPU or GPU that has it: the engine's cache holds autocast's dtype."""
    model_dir, prompts = weak_model
    model, _, _ = load_model_dir(model_dir)
    config = grpo_config(str(model_dir), str(prompts), GRPO_SMALL + ["train.micro_batch_size=2"])
    grpo = GRPO(config, World(), torch.device("cpu"), torch.bfloat16, model=model.train())
    batch = grpo.next_batch()
    loss, metrics = grpo.loss(model, batch)
    assert loss.isfinite() and metrics["completion_length"].item() / grpo.targets(batch).item() >= 1
    assert 0 <= grpo.evaluate(model)["val_reward"] <= 1


def test_a_group_prefills_its_prompt_once_and_samples_what_each_alone_would(weak_model):
    from commonlm.infer.engine import Engine, Request

    model_dir, prompts = weak_model
    model, tok, _ = load_model_dir(model_dir)
    ids = PromptData(prompts).prompts("train")[0].ids
    requests = [Request(prompt_ids=ids, max_tokens=6, temperature=1.0, seed=k, stop_ids=tok.stop_ids)
                for k in range(8)]
    engine = Engine(model, max_batch=8, prefill_chunk=1000)
    together = [s.generated for s in engine.run_all(requests)]
    assert engine.stats.steps <= 6  # one batched decode per token, after a single prefill step
    alone = [Engine(model, max_batch=1).run_all([r])[0].generated for r in requests]
    assert together == alone and len({tuple(g) for g in together}) > 1


def test_grpo_raises_the_sampled_reward(weak_model, tmp_path):
    model_dir, prompts = weak_model
    before = sampled_reward(model_dir, prompts)
    assert 0.05 < before < 0.5  # the SFT model is right sometimes: there is something to reinforce
    result = train(grpo_config(str(model_dir), str(prompts), GRPO_SMALL + ["train.max_steps=80"]), tmp_path / "run",
                   init=model_dir)
    after = sampled_reward(result.final_dir, prompts)
    assert after > before + 0.03, (before, after)
    logged = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert len(logged) == 80 and all(0 <= r["reward"] <= 1 and r["completion_length"] >= 1 for r in logged)
    assert all(0 <= r["reward_std"] <= 0.6 and r["clip_fraction"] == 0 for r in logged)


def test_resume_is_exact_and_the_kl_term(weak_model, tmp_path):
    model_dir, prompts = weak_model
    steps = GRPO_SMALL + ["train.max_steps=4", "train.ckpt_every=2", "train.grpo_kl_beta=0.1",
                          "train.micro_batch_size=2", "train.eval_every=2"]
    config = grpo_config(str(model_dir), str(prompts), steps)
    assert config.train.reference == str(model_dir.resolve())
    train(config, tmp_path / "full", init=model_dir)
    train(grpo_config(str(model_dir), str(prompts), steps), tmp_path / "split", init=model_dir, stop_at_step=2)
    train(resume_config(tmp_path / "split"), tmp_path / "split", resume=True)
    keys = ("loss", "reward", "kl", "completion_length", "val_reward")
    runs = [[{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / d) if "loss" in r or "val_reward" in r]
            for d in ("full", "split")]
    assert runs[0] == runs[1] and len(runs[0]) >= 7  # value for value
    kl = [r["kl"] for r in runs[0] if "kl" in r]
    assert kl[0] == 0 and kl[-1] > 0  # the policy starts as the reference, then moves


def test_a_reward_that_raises_is_reported_with_the_prompt(weak_model, tmp_path, capsys):
    model_dir, prompts = weak_model
    (tmp_path / "mine.py").write_text("def reward(completion, answer, prompt):\n"
                                      "    if answer == '9':\n        raise KeyError('no nines')\n"
                                      "    return float(completion.strip() == answer)\n")
    config = grpo_config(str(model_dir), str(prompts), GRPO_SMALL + [f"train.reward={tmp_path / 'mine.py'}:reward",
                                                                     "train.max_steps=3"])
    assert train(config, tmp_path / "run", init=model_dir).stopped_because == "max_steps"
    err = capsys.readouterr().err
    assert err.count("reward: KeyError: 'no nines' (prompt '") == 1, err[-2000:]


@pytest.mark.parametrize("overrides, match", [
    (["train.reward="], "train.reward='' must name a reward for objective grpo"),
    (["train.reward=nope.py:f"], "reward 'nope.py:f': no file nope.py"),
    (["train.reward=gsm8k", "train.patience=3"], "train.patience=3 must be 0 for objective grpo"),
    (["train.reward=gsm8k", "train.grpo_group_size=1"], "train.grpo_group_size=1 must be at least 2"),
])
def test_bad_settings_are_refused_before_the_run(weak_model, overrides, match):
    model_dir, prompts = weak_model
    with pytest.raises(UserError, match=match):
        grpo_config(str(model_dir), str(prompts), overrides)


def test_chat_data_is_refused(weak_model, tmp_path):
    model_dir, _ = weak_model
    write_jsonl(tmp_path / "c.jsonl", sft_records(problems(4)))
    from commonlm.data.chat import prepare_chat

    prepare_chat([str(tmp_path / "c.jsonl")], model_dir, tmp_path / "chat")
    with pytest.raises(UserError, match="is not prompts data"):
        train(grpo_config(str(model_dir), str(tmp_path / "chat"), ["train.reward=exact"]), tmp_path / "r",
              init=model_dir)


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_exactly(weak_model, tmp_path):
    """Two ranks, each rolling out its own prompts: like one process with twice the prompts (completions are
    seeded by their place in the step, not by rank), the ranks' weights identical, resume exact."""
    model_dir, prompts = weak_model
    steps = GRPO_SMALL + ["train.max_steps=4", "train.ckpt_every=2", "train.micro_batch_size=2",
                          "train.eval_every=2"]
    script = tmp_path / "ddp_grpo.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from safetensors.torch import save_file
        from commonlm.train.trainer import resume_config, train
        from commonlm.tune.grpo import grpo_config
        make = lambda: grpo_config({str(model_dir)!r}, {str(prompts)!r}, {steps!r})
        result = train(make(), {str(tmp_path / "ddp")!r}, init={str(model_dir)!r})
        state = {{k: v.contiguous() for k, v in result.model.state_dict().items() if k != "lm_head.weight"}}
        save_file(state, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.safetensors")
        train(make(), {str(tmp_path / "split")!r}, init={str(model_dir)!r}, stop_at_step=2)
        train(resume_config({str(tmp_path / "split")!r}), {str(tmp_path / "split")!r}, resume=True)
    """))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from safetensors.torch import load_file

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    train(grpo_config(str(model_dir), str(prompts), steps + ["train.micro_batch_size=4"]), tmp_path / "single",
          init=model_dir)
    keys = ("loss", "reward", "reward_std", "completion_length", "val_reward")
    ddp, one, split = ([{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / d)
                        if "loss" in r or "val_reward" in r] for d in ("ddp", "single", "split"))
    assert split == ddp and len(ddp) == len(one) == 7  # resumed under DDP: value for value
    for a, b in zip(ddp, one):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
