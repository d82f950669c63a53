"""Scoring lays each context once with its choices after it (model/kv_cache.SharedPrefix), and packs short ones
side by side: every log-likelihood and greedy flag must equal that of the pair scored alone, in a row of its own."""

import pytest
import torch
import yaml

from commonlm.config import ModelConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.evaluate.scoring import encode_pair, loglikelihoods, score_task
from commonlm.evaluate.tasks import load_task_file
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import SharedPrefix
from tests.evaluate.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the there then word world wonder wolf wood man many manner is a an and good goods pick one of"


def bpe() -> Tokenizer:
    text = " ".join(WORDS.split() * 3)
    return Tokenizer.train_bpe([text] * 20, vocab_size=300)


def random_model(vocab: int, **overrides) -> Decoder:
    torch.manual_seed(0)
    config = dict(family="llama", n_layer=2, n_head=4, d_model=64, vocab_size=vocab, max_seq_len=64)
    return Decoder(ModelConfig(**{**config, **overrides})).eval()


def alone(model: Decoder, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Each pair in a forward pass of its own: the reference."""
    out = []
    for context, continuation in pairs:
        ids = (context + continuation)[-(model.config.max_seq_len + 1):]
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0][0, -len(continuation):].log_softmax(-1)
        want = torch.tensor(continuation)
        out.append((logp.gather(-1, want[:, None]).sum().item(), bool((logp.argmax(-1) == want).all())))
    return out


def random_pairs(vocab: int, seed: int, contexts: int = 9) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1-70 tokens (some longer than the model's 64) with 1-5 choices of 1-6 tokens, some repeated."""
    g = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=g))

    pairs = []
    for _ in range(contexts):
        context = torch.randint(0, vocab, (draw(1, 70),), generator=g).tolist()
        choices = [torch.randint(0, vocab, (draw(1, 7),), generator=g).tolist() for _ in range(draw(1, 6))]
        choices.append(choices[0][:-1] + [(choices[0][-1] + 1) % vocab])  # the same but for its last token
        pairs += [(context, choice) for choice in choices + choices[:1]]  # and one twice
    return pairs


def test_the_layout_gives_hand_made_positions_and_visibility():
    # one row: item 0 (a 3-token context, a continuation of 2 tokens, one of 1), item 1 (2 + 1), 2 of padding
    items = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    branches = torch.tensor([[0, 0, 0, 1, 1, 2, 0, 0, 1, 0, 0]])
    layout = SharedPrefix(items, branches)
    assert layout.positions(11).tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 0, 0]]
    sees = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 5],
            [6], [6, 7], [6, 7, 8], [9], [10]]
    expected = torch.zeros(11, 11, dtype=torch.bool)
    for query, keys in enumerate(sees):
        expected[query, keys] = True
    k = v = torch.zeros(1, 2, 11, 4)
    assert torch.equal(layout.update(0, k, v)[2][0, 0], expected)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_and_packed_rows_score_every_pair_as_it_scores_alone(batch_size):
    model = random_model(300)
    pairs = random_pairs(300, seed=1)
    for (ll, greedy), (want_ll, want_greedy) in zip(loglikelihoods(model, pairs, batch_size), alone(model, pairs)):
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy


def test_fewer_forward_passes_than_rows_of_pairs():
    model = random_model(300)
    pairs = random_pairs(300, seed=2, contexts=12)
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    loglikelihoods(model, pairs, batch_size=2)
    hook.remove()
    assert len(calls) < len(pairs) / 2 / 2  # each context once (several choices) and short ones packed together
    assert sum(rows * width for rows, width in calls) < sum(len(c) + len(x) - 1 for c, x in pairs) / 2


def test_a_sliding_window_narrows_each_choice_as_in_a_row_of_its_own():
    model = random_model(300, family="mistral", sliding_window=8, n_kv_head=2)
    pairs = random_pairs(300, seed=3)
    for (ll, greedy), (want_ll, want_greedy) in zip(loglikelihoods(model, pairs, 4), alone(model, pairs)):
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    whole = random_model(300, family="mistral", n_kv_head=2)
    assert max(abs(a[0] - b[0]) for a, b in zip(alone(whole, pairs), alone(model, pairs))) > 1e-2  # it narrows


def test_dynamic_ntk_takes_the_largest_position_not_the_row_length():
    model = random_model(300, rope_scaling="dynamic", rope_factor=2.0, rope_original_len=16)
    context = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    pairs = [(context, [5, 6, 7, 8]), (context, [9, 10]), (context, [11, 12, 13])]
    # the reference: the pairs in one right-padded batch, whose longest sets the frequencies for all
    rows = torch.zeros(3, 23, dtype=torch.long)
    for r, (c, x) in enumerate(pairs):
        rows[r, : len(c) + len(x) - 1] = torch.tensor((c + x)[:-1])
    with torch.no_grad():
        logits = model(rows)[0]
    for r, ((c, x), (ll, _)) in enumerate(zip(pairs, loglikelihoods(model, pairs))):
        logp = logits[r, len(c) - 1 : len(c) + len(x) - 1].log_softmax(-1)
        assert ll == pytest.approx(logp.gather(-1, torch.tensor(x)[:, None]).sum().item(), abs=1e-4)


def task_file(tmp_path, records, **spec):
    write_jsonl(tmp_path / "items.jsonl", records)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"data": "items.jsonl", **spec}))
    return load_task_file(tmp_path / "task.yaml")


def test_choices_that_merge_with_the_context_end_few_shot_with_two_and_five_choices(tmp_path):
    tok = bpe()
    model = random_model(tok.vocab_size, max_seq_len=32)
    # after "wo" with no delimiter, the context's last token merges with the choice's first
    five = ["rd is good", "rld of the man", "nder then", "lf and a man", "od is good"]
    records = [{"q": f"pick one of {i}: wo", "choices": five, "answer": i % 5} for i in range(4)]
    records += [{"q": f"the man is {i}: ", "choices": ["good", "goods"], "answer": i % 2} for i in range(4)]
    task = task_file(tmp_path, records, prompt="{q}", choices="choices", answer="answer", delimiter="",
                     separator="\n")
    merged = 0
    for k in (0, 2):
        result = score_task(model, tok, task, few_shot=k, batch_size=3)
        for item, scored in zip(task.items, result.per_item):
            prompt = task.prompt(item, k)
            pairs = [encode_pair(tok, prompt, choice) for choice in item.choices]
            merged += sum(tok.encode(prompt + c)[: len(ids)] != ids for c, (ids, _) in zip(item.choices, pairs))
            assert scored["loglikelihoods"] == pytest.approx([ll for ll, _ in alone(model, pairs)], abs=1e-4)
    assert merged > 0  # the case this test is for happened
    assert result.truncated > 0  # and few-shot prompts longer than the model's context lost their beginning


def test_the_thread_count_is_put_back():
    torch.set_num_threads(2)
    try:
        loglikelihoods(random_model(300), random_pairs(300, seed=5), batch_size=2)
        assert torch.get_num_threads() == 2  # whatever the governor chose while scoring
    finally:
        torch.set_num_threads(1)
