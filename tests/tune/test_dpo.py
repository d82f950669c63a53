"""DPO through the one loop: the loss is the reference formula, a reply's log-prob counts only its tokens,
a tiny model learns a preference, resume is exact, and bad pairs are refused."""

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
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(16):  # wave2-references.md: Δ = (π_c − ref_c) − (π_r − ref_r); loss = −log σ(β Δ)
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert abs(loss[i].item() - (-math.log(1 / (1 + math.exp(-beta * delta))))) < 1e-6
        assert abs(chosen[i].item() - beta * (pc[i].item() - rc[i].item())) < 1e-6
        assert abs(rejected[i].item() - beta * (pr[i].item() - rr[i].item())) < 1e-6
    one = dpo_loss(torch.tensor([1.5]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1)[0]
    assert abs(one.item() - 0.620957) < 1e-6  # the check value of the reference


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
