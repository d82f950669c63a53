"""Supervised fine-tuning through the one loop: only assistant tokens carry loss, a base model learns the
assistant's side of conversations, resume is exact, and the CLI verb refuses data of the wrong kind."""

import random

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.data.chat import ChatData
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder
from commonlm.model.loss import IGNORE, lm_loss
from commonlm.train.metrics import read_metrics
from commonlm.train.trainer import train
from commonlm.tune.sft import rows, sft_config
from tests.tune.conftest import base_and_data as make_base_and_data

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["train.dtype=fp32", "train.threads=1", "train.log_every=1", "train.micro_batch_size=4",
         "train.eval_every=5", "train.lr=3e-3", "train.warmup_steps=2"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Questions about adding small numbers, answered by a fixed pattern a tiny model can pick up."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"messages": [{"role": "system", "content": "add"},
                                 {"role": "user", "content": f"{a}+{b}"},
                                 {"role": "assistant", "content": f"{a}+{b}={a + b}"}]})
    return out


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("sft"), conversations(120), val_fraction=0.1)


def test_only_the_assistants_tokens_carry_loss(base_and_data):
    _, chat = base_and_data
    data = ChatData(chat)
    x, y = rows([data.conversation("train", i) for i in range(4)], 64, 0, torch.device("cpu"))
    tok = Tokenizer.load(chat)
    for r in range(4):
        kept = tok.decode(y[r][y[r] != IGNORE].tolist())
        a_plus_b = tok.decode(x[r].tolist()).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        total = sum(int(n) for n in a_plus_b.split("+"))
        assert kept == f"{a_plus_b}={total}<|im_end|>\n"  # the answer and its end: no system, user or header
    logits = torch.randn(*y.shape, 320)
    garbage = logits.clone()
    garbage[y == IGNORE] = torch.randn_like(garbage[y == IGNORE]) * 100  # what the model says elsewhere
    assert torch.equal(lm_loss(logits, y), lm_loss(garbage, y))



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_rows_give_each_conversation_what_it_gets_alone(base_and_data, family):
    """Packing changes the layout, never the numbers: every conversation's logits equal those of it alone."""
    _, chat = base_and_data
    torch.manual_seed(0)
    config = ModelConfig(family=family, n_layer=2, n_head=4, d_model=64, vocab_size=320, max_seq_len=160)
    model = Decoder(config).eval()
    data = ChatData(chat)
    convs = [data.conversation("train", i) for i in range(6)]
    x, y, packed = rows(convs, 160, 0, torch.device("cpu"), pack=True)
    assert x.shape[0] < len(convs)  # several conversations share a row
    assert torch.equal(packed.positions(x.shape[1])[0, :3], torch.arange(3))
    with torch.no_grad():
        logits, _ = model(x, cache=packed)
        alone = [model(rows([c], 160, 0, torch.device("cpu"))[0])[0][0] for c in convs]
    starts = ((packed.positions(x.shape[1]) == 0) & (packed.segments >= 0)).nonzero().tolist()  # (not padding)
    for (r, at), own in zip(starts, alone):
        assert torch.allclose(logits[r, at : at + own.shape[0]], own, atol=1e-5)  # (positions restart)
    assert len(starts) == len(convs)
    padded_x, padded_y = rows(convs, 160, 0, torch.device("cpu"))
    with torch.no_grad():
        padded_loss = lm_loss(model(padded_x)[0], padded_y, reduction="sum")
    assert abs(lm_loss(logits, y, reduction="sum").item() - padded_loss.item()) < 1e-3
    assert int((y != IGNORE).sum()) == int((padded_y != IGNORE).sum())

def test_sft_learns_the_assistants_side_and_resumes_exactly(base_and_data, tmp_path):
    base, chat = base_and_data
    full = train(sft_config(str(base), str(chat), SMALL + ["train.max_steps=30"]), tmp_path / "full", init=base)
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "full") if "val_loss" in r]
    assert full.stopped_because == "max_steps" and vals[-1] < vals[0] - 1.0, vals
    assert (tmp_path / "full" / "final" / "model.safetensors").is_file()

    config = sft_config(str(base), str(chat), SMALL + ["train.max_steps=30", "train.ckpt_every=10"])
    train(config, tmp_path / "split", init=base, stop_at_step=10)
    from commonlm.train.trainer import resume_config

    train(resume_config(tmp_path / "split"), tmp_path / "split", resume=True)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("full", "split")]
    assert losses[0] == losses[1]  # value for value


def test_tune_sft_refuses_text_data(base_and_data, byte_data, tmp_path):
    base, _ = base_and_data
    with pytest.raises(UserError, match="chat"):
        train(sft_config(str(base), str(byte_data), SMALL), tmp_path / "r", init=base)
