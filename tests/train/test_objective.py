"""The loop takes any objective: a second one, written here, trains through `train(..., objective=...)`
without a change to the loop, and every target token of a step weighs the same however they fall into
micro-batches (what masked fine-tuning data needs; a mean per micro-batch would not give it)."""

import torch

from commonlm.model.loss import IGNORE
from commonlm.train.checkpoint import latest_checkpoint
from commonlm.train.objective import NextToken
from commonlm.train.trainer import train
from tests.train.test_trainer import small_config, train_losses


class MaskedPrefix(NextToken):
    """A stand-in for fine-tuning on prompts and answers: in each row the targets before a position that
    the row's first token picks (its "prompt") carry no loss, so micro-batches hold unequal numbers of
    targets. It also counts what it trained on, as an extra metric."""

    def next_batch(self):
        x, y = super().next_batch()
        prompt = x[:, :1] % y.shape[1]  # a function of the content: the same row is masked the same in any batch
        return x, y.masked_fill(torch.arange(y.shape[1]) < prompt, IGNORE)

    def loss(self, model, batch):
        total, _ = super().loss(model, batch)
        return total, {"answer_tokens": self.targets(batch).float()}


def test_a_second_objective_plugs_into_the_loop(byte_data, tmp_path):
    one = train(small_config(byte_data, "train.max_steps=4", "train.micro_batch_size=8"), tmp_path / "one",
                objective=MaskedPrefix)
    two = train(small_config(byte_data, "train.max_steps=4", "train.tokens_per_step=256"), tmp_path / "two",
                objective=MaskedPrefix)
    # 8 rows in one pass vs 2 x 4 rows with different numbers of answer tokens: the same mean over all of them
    one_losses, two_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one_losses) == 4 and all(abs(a - b) < 1e-5 for a, b in zip(one_losses, two_losses))
    for (name, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    plain = train(small_config(byte_data, "train.max_steps=4", "train.micro_batch_size=8"), tmp_path / "plain")
    assert train_losses(tmp_path / "plain")[0] != one_losses[0]  # the masks did change what was trained on
    assert one.final_dir is not None and plain.final_dir is not None
    assert latest_checkpoint(tmp_path / "one") is not None  # checkpoints carry the objective's position


def test_extra_metrics_are_reported_per_target_token(byte_data, tmp_path):
    train(small_config(byte_data, "train.max_steps=2", "train.micro_batch_size=8"), tmp_path / "r",
          objective=MaskedPrefix)
    from commonlm.train.metrics import read_metrics

    rows = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert rows and all(r["answer_tokens"] == 1.0 for r in rows)  # the sum of the counts over the count
