"""Scoring and generated answers both follow the CPUs other processes leave free (threads.py's governor, as
training does), and put torch's thread count back at the end."""

import pytest
import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.evaluate.scoring import loglikelihoods, score_task
from commonlm.evaluate.tasks import load_tasks
from tests.evaluate.test_shared_prefix import random_model, random_pairs
from tests.train.test_threads import FakeClock, two_cpus  # noqa: F401 (two_cpus: a fixture)


@pytest.mark.parametrize("path", ["loglikelihoods", "generated answers"])
def test_a_busy_machine_leaves_evaluation_one_thread_and_the_count_comes_back(two_cpus, monkeypatch, path):  # noqa: F811
    clock = FakeClock(monkeypatch)
    torch.set_num_threads(2)
    model = random_model(300 if path == "loglikelihoods" else Tokenizer.byte_level().vocab_size, max_seq_len=160)
    seen = []

    def busy_forward(module, args):  # each forward pass: 3 s pass, another process keeping one CPU busy
        seen.append(torch.get_num_threads())
        clock.advance(3.0, busy_cpus=2.0, ours=1.0)

    model.register_forward_pre_hook(busy_forward)
    if path == "loglikelihoods":
        loglikelihoods(model, random_pairs(300, seed=5), batch_size=2)
    else:
        score_task(model, Tokenizer.byte_level(), load_tasks("passkey:128")[0], limit=2)
    assert seen[0] == 2 and seen[-1] == 1  # started with both CPUs, gave one up to the other process
    assert torch.get_num_threads() == 2
