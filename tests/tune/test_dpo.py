"""DPO through the one loop: the loss is the reference formula, and sigmoid, IPO and SimPO losses and rewards
equal TRL's own code on the same log-probabilities; a reply's log-prob counts only its tokens; a tiny model
learns a preference with each variant (SimPO without a reference), resume is exact, and bad input is refused."""

import json
import math
import random

import pytest
import torch

from commonlm.data.chat import ChatData, prepare_chat
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.loss import IGNORE
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import resume_config, train
from commonlm.tune.dpo import dpo_config, dpo_loss, reply_logps
from commonlm.tune.sft import rows, sft_config
from tests.tune.conftest import base_and_data as make_base_and_data

from .test_sft import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Sums, where the right answer is preferred to the answer plus one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"{a}+{b}", "chosen": f"yes {a + b}", "rejected": f"no {a + b + 1}"})
    return out


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("dpo"), pairs(80), val_fraction=0.2, preference=True)


def test_loss_and_rewards_are_the_reference_formula():
    torch.manual_seed(1)
    policy, reference = torch.randn(16, 2, dtype=torch.float64) * 5, torch.randn(16, 2, dtype=torch.float64) * 5
    lengths = torch.ones(16, 2)
    beta = 0.1
    loss, chosen, rejected = dpo_loss(policy, reference, lengths, beta)
    (pc, pr), (rc, rr) = policy.T.tolist(), reference.T.tolist()
    for i in range(16):  # wave2-references.md: Δ = (π_c − ref_c) − (π_r − ref_r); loss = −log σ(β Δ)
        delta = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert abs(loss[i].item() - (-math.log(1 / (1 + math.exp(-beta * delta))))) < 1e-6
        assert abs(chosen[i].item() - beta * (pc[i] - rc[i])) < 1e-6
        assert abs(rejected[i].item() - beta * (pr[i] - rr[i])) < 1e-6
    one = dpo_loss(torch.tensor([[1.5, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2), 0.1)[0]
    assert abs(one.item() - 0.620957) < 1e-6  # the check value of the reference


def sequences(pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities [2P, T] (chosen rows, then rejected rows: TRL's order) that are zero outside
    each row's completion, which takes a random 1..T-1 tokens at the end, and the completion mask [2P, T + 1]."""
    g = torch.Generator().manual_seed(seed)
    T = 12
    n = torch.randint(1, T, (2 * pairs,), generator=g)
    mask = torch.zeros(2 * pairs, T + 1, dtype=torch.long)
    for r in range(2 * pairs):
        mask[r, T + 1 - n[r] :] = 1
    per_token = -torch.rand(2 * pairs, T, generator=g, dtype=torch.float64) * 4 * mask[:, 1:]
    return per_token, mask, n


class FixedLogProbs:
    """Stands in for the policy model TRL's DPOTrainer calls with `fused_lm_head=True` (trl.trainer.utils.
    add_fused_lm_head): it returns the given per-token log-probabilities as a FusedCausalLMOutput."""

    def __init__(self, per_token: torch.Tensor):
        self.per_token, self.training = per_token, True

    def __call__(self, input_ids, labels, fused_lm_head, **_):
        from trl.trainer.utils import FusedCausalLMOutput

        zeros = torch.zeros_like(self.per_token)
        return FusedCausalLMOutput(log_probs=self.per_token, entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool(), label_mask=labels[:, 1:] != -100)


def trl_dpo(kind: str, beta: float, per_token: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor):
    """TRL 1.16's DPOTrainer._compute_loss (the unbound method) for ONE pair, on a minimal stand-in for the
    trainer carrying only the attributes it reads (a real DPOTrainer needs a model, a tokenizer and a dataset;
    the loss it computes is the same method): the loss and the logged chosen and rejected rewards."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    model = FixedLogProbs(per_token)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[kind],
                              loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    ids = torch.zeros_like(mask)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": reference[:, 0], "ref_rejected_logps": reference[:, 1]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


def trl_simpo(beta: float, gamma: float, average: torch.Tensor):
    """TRL 1.16's SimPO: CPOTrainer.cpo_loss (the unbound method; trl.experimental.cpo) with loss_type "simpo"
    on a stand-in trainer with only the attributes it reads, on length-averaged log-probabilities (what its
    concatenated_forward passes for simpo), cpo_alpha 0 and no AlphaPO transform: loss and rewards per pair."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo",
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, average[:, 0], average[:, 1])


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_loss_and_rewards_equal_trls(kind):
    beta, gamma, pairs = 0.3, 0.7, 6
    per_token, mask, n = sequences(pairs, seed={"sigmoid": 1, "ipo": 2, "simpo": 3}[kind])
    policy = torch.stack(per_token.sum(-1).chunk(2), -1)  # [P, 2]: (chosen, rejected)
    lengths = torch.stack(n.chunk(2), -1)
    reference = policy + torch.randn(pairs, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss, chosen, rejected = dpo_loss(policy, reference, lengths, beta, kind, gamma)
    if kind == "simpo":
        theirs = trl_simpo(beta, gamma, policy / lengths)
        for ours, trl in zip((loss, chosen, rejected), theirs):
            assert torch.allclose(ours, trl, rtol=0, atol=1e-5), (ours, trl)
        return
    for k in range(pairs):
        rows_k = [k, pairs + k]
        theirs = trl_dpo(kind, beta, per_token[rows_k], mask[rows_k], reference[k : k + 1])
        ours = (loss[k].item(), chosen[k].item(), rejected[k].item())
        assert all(abs(a - b) < 1e-5 for a, b in zip(ours, theirs)), (kind, k, ours, theirs)
    assert loss.std() > 0.01 and (kind != "ipo" or (lengths[:, 0] != lengths[:, 1]).any())  # varied cases


def test_a_replys_log_prob_counts_only_its_tokens(base_and_data):
    _, pref = base_and_data
    data = ChatData(pref)
    assert data.preference and data.conversations("train") % 2 == 0
    x, y = rows([data.conversation("train", i) for i in range(4)], 64, 0, torch.device("cpu"))
    tok = Tokenizer.load(pref)
    kept = [tok.decode(y[r][y[r] != IGNORE].tolist()) for r in range(4)]
    assert kept[0].startswith("yes ") and kept[1].startswith("no ") and kept[0].endswith("<|im_end|>\n")
    logits = torch.randn(*y.shape, 320)
    garbage = logits.clone()
    garbage[y == IGNORE] = torch.randn_like(garbage[y == IGNORE]) * 100  # the prompt's and padding's logits
    assert torch.equal(reply_logps(logits, y), reply_logps(garbage, y))
    manual = sum(logits[0, t].log_softmax(-1)[y[0, t]] for t in range(y.shape[1]) if y[0, t] != IGNORE)
    assert abs(reply_logps(logits, y)[0].item() - manual.item()) < 1e-4


def test_dpo_learns_the_preference_and_resumes_exactly(base_and_data, tmp_path):
    base, pref = base_and_data
    config = dpo_config(str(base), str(pref), SMALL + ["train.max_steps=30"])
    assert config.train.objective == "dpo" and config.train.reference == str(base.resolve())
    full = train(config, tmp_path / "full", init=base)
    accuracy = [r["val_accuracy"] for r in read_metrics(tmp_path / "full") if "val_accuracy" in r]
    assert full.stopped_because == "max_steps" and accuracy[-1] > accuracy[0] and accuracy[-1] >= 0.9, accuracy

    config = dpo_config(str(base), str(pref), SMALL + ["train.max_steps=30", "train.ckpt_every=10"])
    train(config, tmp_path / "split", init=base, stop_at_step=10)
    train(resume_config(tmp_path / "split"), tmp_path / "split", resume=True)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("full", "split")]
    assert losses[0] == losses[1]  # value for value


@pytest.mark.parametrize("kind", ["ipo", "simpo"])
def test_variants_learn_the_preference(base_and_data, tmp_path, kind):
    base, pref = base_and_data
    extra = ["train.dpo_beta=2", "train.simpo_gamma=1"] if kind == "simpo" else ["train.dpo_beta=0.5"]
    config = dpo_config(str(base), str(pref), SMALL + ["train.max_steps=30", f"train.dpo_loss={kind}", *extra])
    if kind == "simpo":  # reference-free: none is recorded, and none is loaded even if one is named
        assert config.train.reference == ""
        config.train.reference = str(tmp_path / "no-such-model")
    train(config, tmp_path / "run", init=base)
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_accuracy"] >= 0.9, evals
    assert all(f"val_{m}" in evals[-1] for m in ("chosen_reward", "rejected_reward", "margin", "accuracy"))


def test_bad_pairs_and_wrong_data_are_refused(base_and_data, tmp_path):
    base, pref = base_and_data
    bad = tmp_path / "bad.jsonl"
    for line, match in [({"prompt": "hi", "chosen": "a", "rejected": "a"}, "bad.jsonl:2: 'chosen' and 'rejected'"),
                        ({"prompt": "hi", "chosen": " ", "rejected": "a"}, "bad.jsonl:2: 'chosen' must be"),
                        ("{not json", "bad.jsonl:2: not JSON")]:
        bad.write_text(json.dumps(pairs(1)[0]) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
        with pytest.raises(UserError, match=match):
            prepare_chat([str(bad)], base, tmp_path / "out", preference=True)
    with pytest.raises(UserError, match="tune dpo"):
        train(sft_config(str(base), str(pref), SMALL), tmp_path / "r", init=base)
    with pytest.raises(UserError, match="train.reference=''.*ipo loss"):
        dpo_config(str(base), str(pref), ["train.dpo_loss=ipo", "train.reference="])
    with pytest.raises(UserError, match="train.dpo_loss='kto' is not one of: sigmoid, ipo, simpo"):
        dpo_config(str(base), str(pref), ["train.dpo_loss=kto"])
