"""Scorers on hand-built items with known answers, through a rigged model (tests/evaluate/conftest.py)."""

import math

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.evaluate.scoring import answer_of, encode_pair, loglikelihoods, score_task
from commonlm.evaluate.tasks import load_task_file
from commonlm.model.decoder import Decoder
from tests.evaluate.conftest import bigram_model, logp, table, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = Tokenizer.byte_level()


def task_file(tmp_path, records, **spec):
    import yaml

    write_jsonl(tmp_path / "items.jsonl", records)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"data": "items.jsonl", **spec}))
    return load_task_file(tmp_path / "task.yaml")


def test_encode_pair_moves_trailing_space_into_the_continuation():
    context, continuation = encode_pair(TOK, "Answer: ", "Paris")
    assert TOK.decode(context) == "Answer:" and TOK.decode(continuation) == " Paris"
    context, continuation = encode_pair(TOK, "", "hi")
    assert context == [TOK.eot_id] and TOK.decode(continuation) == "hi"


def test_length_normalisation_against_hand_computed_values(tmp_path):
    row = table({"a": 2.0, " ": 2.0, "b": 0.0})  # the same logits after every token
    model = bigram_model(row)
    task = task_file(tmp_path, [{"q": "x", "choices": ["aaaa", "b"], "answer": 0},
                                {"q": "y", "choices": ["b", "aaaa"], "answer": 0}],
                     prompt="{q}:", choices="choices", answer="answer")
    result = score_task(model, TOK, task)
    a, space, b = logp(row[0], "a"), logp(row[0], " "), logp(row[0], "b")
    long, short = space + 4 * a, space + b  # " aaaa" and " b"
    assert short > long and long / 4 > short / 1  # raw prefers " b", per character " aaaa"
    assert result.per_item[0]["loglikelihoods"] == pytest.approx([long, short], abs=1e-4)
    assert result.per_item[1]["loglikelihoods"] == pytest.approx([short, long], abs=1e-4)
    # item 1's answer "aaaa": acc wrong, acc_norm right; item 2's answer "b": acc right, acc_norm wrong
    assert result.metrics == {"acc": 0.5, "acc_norm": 0.5}
    assert [p["pick"] for p in result.per_item] == [1, 0] and [p["pick_norm"] for p in result.per_item] == [0, 1]
    assert result.chance == 0.5


def test_a_model_rigged_for_a_choice_scores_by_it(tmp_path):
    records = [{"question": f"q{i}", "choices": ["cat", "dog", "cow", "owl"], "answer": i % 4} for i in range(8)]
    rigged = bigram_model(table({"d": 3.0, "o": 3.0, "g": 3.0, " ": 3.0}))  # " dog" is the likeliest choice
    task = task_file(tmp_path, records, prompt="{question}\nAnswer:", choices="choices", answer="answer")
    result = score_task(rigged, TOK, task)
    assert all(p["pick"] == 1 for p in result.per_item)
    assert result.metrics["acc"] == 2 / 8 and result.chance == 0.25


def test_mmlu_layout_asks_for_a_letter(tmp_path):
    records = [{"subject": "anatomy", "question": "Which?", "choices": ["w", "x", "y", "z"], "answer": a}
               for a in (2, 3)]
    task = task_file(tmp_path, records, layout="mmlu")
    assert task.prompt(task.items[0]) == ("The following are multiple choice questions (with answers) about anatomy."
                                          "\n\nWhich?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert task.items[0].choices == [" A", " B", " C", " D"]
    result = score_task(bigram_model(table({"C": 3.0, " ": 3.0, "A": 1.0})), TOK, task)
    assert [p["pick"] for p in result.per_item] == [2, 2] and result.metrics["acc"] == 0.5


def test_batched_right_padded_scores_equal_one_row_at_a_time():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(family="llama", n_layer=2, n_head=4, d_model=64, vocab_size=300,
                                max_seq_len=32)).eval()
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(11):
        n_context, n_cont = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        pairs.append((torch.randint(0, 300, (n_context,), generator=g).tolist(),
                      torch.randint(0, 300, (n_cont,), generator=g).tolist()))
    context = pairs[0][0]
    pairs += [(context, [t]) for t in (5, 6, 7)] + [(context[:-1], [context[-1], 8])]  # rows that share an input
    batched = loglikelihoods(model, pairs, batch_size=4)
    for (context, continuation), (ll, greedy) in zip(pairs, batched):
        ids = (context + continuation)[-33:]  # too long: the beginning goes
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        lp = logits[0, -len(continuation):].log_softmax(-1)
        want = torch.tensor(continuation)
        assert ll == pytest.approx(lp.gather(-1, want[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == want).all())


def test_cloze_is_right_when_greedy_decoding_gives_the_last_word(tmp_path):
    chain = {"e": {" ": 5.0}, " ": {"m": 5.0}, "m": {"a": 5.0}, "a": {"t": 5.0}}
    model = bigram_model(table({"x": 0.0}, chain))
    task = task_file(tmp_path, [{"text": "the cat sat on the mat"}, {"text": "the cat sat on the hat"}],
                     layout="lambada")
    result = score_task(model, TOK, task)
    assert [p["greedy"] for p in result.per_item] == [True, False] and result.metrics["acc"] == 0.5
    want = sum(logp(table({"x": 0.0}, chain)[ord(p)], c) for p, c in zip("e ma", " mat"))
    assert result.per_item[0]["loglikelihood"] == pytest.approx(want, abs=1e-4)
    assert result.chance == 0.0


ANSWER_42 = {":": {" ": 5.0}, " ": {"4": 5.0}, "4": {"2": 5.0}, "2": {"\n": 5.0}, "\n": {"\n": 5.0}}


def test_generative_gsm8k_and_exact_match_through_the_engine(tmp_path):
    model = bigram_model(table({"z": 0.0}, ANSWER_42))
    records = [{"question": "6 x 7?", "answer": "six sevens #### 42"}, {"question": "40 + 1?", "answer": "#### 41"},
               {"question": "2 x 21?", "answer": "#### 42.0"}]
    gsm = score_task(model, TOK, task_file(tmp_path, records, layout="gsm8k", max_tokens=8))
    assert [p["answer"] for p in gsm.per_item] == [" 42"] * 3  # cut at "\n\n"
    assert [p["score"] for p in gsm.per_item] == [1.0, 0.0, 1.0]
    records = [{"q": "a", "a": "42"}, {"q": "b", "a": "4"}]
    exact = score_task(model, TOK, task_file(tmp_path, records, prompt="{q}:", answer="a", metric="exact",
                                             max_tokens=8))
    assert exact.metrics["acc"] == 0.5


def test_answer_of_cuts_at_stop_strings_then_takes_the_regex_match():
    assert answer_of(" 12 apples\n\nQ: next", ["\n\n"]) == " 12 apples"
    assert answer_of(" 12 apples\n\nQ: next", ["\n\n"], r"[-+]?\d+") == "12"
    assert answer_of(" none", [], r"\d+") == ""


def test_quantized_model_scores_like_the_full_one(tmp_path):
    from commonlm.infer.quant import quantize_model

    records = [{"q": f"q{i}", "choices": ["aaaa", "b", "ab"], "answer": i % 3} for i in range(6)]
    row = table({"a": 2.0, " ": 2.0, "b": 0.5})
    task = task_file(tmp_path, records, prompt="{q}:", choices="choices", answer="answer")
    full = score_task(bigram_model(row), TOK, task)
    quantized = bigram_model(row)
    quantize_model(quantized, "int8", dtype=torch.float32)
    assert score_task(quantized, TOK, task).metrics == full.metrics
    assert not math.isnan(full.metrics["acc"])
