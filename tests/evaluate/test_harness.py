"""The lm-evaluation-harness bridge: the harness, run offline on our model directory and the same items, gets our
log-likelihoods, picks and accuracies item by item (multiple choice with few-shot prompts cut to the context,
WinoGrande's blank with a few-shot example, LAMBADA's cloze)."""

import json

import pytest
import torch

from commonlm.api import load
from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.harness import disagreements, main, run_harness, write_harness_task
from commonlm.evaluate.tasks import load_tasks
from commonlm.model.decoder import Decoder
from commonlm.modeldir import save_model_dir
from tests.evaluate.conftest import write_jsonl

pytest.importorskip("lm_eval")

TEXT = ("The cat sat on the mat. The dog ran in the park. Question: what is red? Answer: an apple. "
        "Birds fly south in the winter, and fish swim in the sea.")
MMLU = [
    {"subject": "nature", "question": "What is red?", "choices": ["an apple", "the sky", "grass", "the sea"],
     "answer": 0},
    {"subject": "nature", "question": "What barks?", "choices": ["a cat", "a dog", "a fish", "a bird"], "answer": 1},
    {"subject": "nature", "question": "What swims?", "choices": ["a cat", "a mat", "a fish", "a park"], "answer": 2},
    {"subject": "places", "question": "Where do dogs run?", "choices": ["the sea", "the sky", "a mat", "the park"],
     "answer": 3},
    {"subject": "places", "question": "Where do birds fly in winter?", "choices": ["north", "south", "up", "home"],
     "answer": 1},
    {"subject": "places", "question": "Where do fish swim?", "choices": ["the sea", "the park", "the mat", "a tree"],
     "answer": 0},
]
ARC = [  # labelled choices of different lengths: acc_norm can pick otherwise than acc
    {"question": "Which animal can fly?", "choices": {"text": ["a bird", "a very large dog", "cat"],
                                                      "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"question": "What is the sky?", "choices": {"text": ["blue", "a mat in the park", "red"],
                                                 "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"question": "Where does the cat sit?", "choices": {"text": ["on the mat", "in the sea"],
                                                        "label": ["1", "2"]}, "answerKey": "1"},
    {"question": "What is an apple?", "choices": {"text": ["red", "a bird that swims", "the winter"],
                                                  "label": ["A", "B", "C"]}, "answerKey": "A"},
]
WINOGRANDE = [
    {"sentence": "The cat sat on the _ because it was soft.", "option1": "mat", "option2": "dog", "answer": "1"},
    {"sentence": "The dog ran to the _ to play.", "option1": "park", "option2": "apple", "answer": "1"},
    {"sentence": "Fish swim in the _ all winter.", "option1": "park", "option2": "sea", "answer": "2"},
]
LAMBADA = [{"text": "The cat sat on the mat"}, {"text": "The dog ran in the park"},
           {"text": "Birds fly south in the winter"}]


@pytest.fixture(scope="module")
def model_and_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    config = RunConfig(model=ModelConfig(family="llama", n_layer=2, n_head=4, d_model=64, vocab_size=320,
                                         max_seq_len=64))
    tokenizer = Tokenizer.train_bpe([TEXT] * 20, vocab_size=300)  # merges: spaces before words, as real ones
    save_model_dir(root / "model", Decoder(config.model), tokenizer, config)
    files = {"mmlu": MMLU, "arc": ARC, "winogrande": WINOGRANDE, "lambada": LAMBADA}
    for layout, records in files.items():
        write_jsonl(root / f"{layout}.jsonl", records)
        extra = "few_shot: 1\n" if layout in ("mmlu", "winogrande") else ""
        (root / f"{layout}.yaml").write_text(f"data: {layout}.jsonl\nlayout: {layout}\n{extra}")
    tasks = [task for layout in files for task in load_tasks(str(root / f"{layout}.yaml"))]
    return root / "model", tasks


def test_the_harness_agrees_item_by_item(model_and_tasks):
    model_dir, tasks = model_and_tasks
    ours = load(model_dir, device="cpu").evaluate_tasks(tasks, batch_size=4)
    rng = torch.random.get_rng_state()
    theirs = run_harness(model_dir, tasks, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's generator is left alone
    assert [r.name for r in theirs] == [t.name for t in tasks]
    assert ours[0].truncated > 0  # few-shot MMLU prompts are longer than the 64-token context: both cut the start
    for task, mine, other in zip(tasks, ours, theirs):
        assert len(other.per_item) == len(mine.per_item) == len(task.items)
        assert disagreements(mine, other) == []
        for item, a, b in zip(task.items, mine.per_item, other.per_item):
            assert a["where"] == b["where"] == item.where
            if task.kind == "cloze":
                assert b["loglikelihood"] == pytest.approx(a["loglikelihood"], abs=1e-4)
                assert b["greedy"] == a["greedy"]
                continue
            assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-4)
            assert b["acc"] == item.credit[a["pick"]]  # the harness's own verdict on each item, against our pick
            assert b["acc_norm"] == item.credit[a["pick_norm"]]
        for metric in other.metrics:  # accuracies exactly; perplexity as far as the log-likelihoods agree
            assert other.metrics[metric] == pytest.approx(mine.metrics[metric], rel=1e-4 if metric == "ppl" else 1e-9)
    assert {r.metrics["acc"] for r in ours[:3]} - {0.0, 1.0}  # not a degenerate all-right or all-wrong model
    assert any(a["pick"] != a["pick_norm"] for r in ours[:3] for a in r.per_item)  # acc_norm differs somewhere


def test_the_harness_task_carries_our_prompt(model_and_tasks, tmp_path):
    _, tasks = model_and_tasks
    mmlu = tasks[0]
    name, items = write_harness_task(mmlu, tmp_path, few_shot=1, limit=2)
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert len(records) == len(items) == 2
    for record, item in zip(records, items):
        assert record["prefix"] + record["context"] == mmlu.prompt(item, 1)
        assert record["prefix"].startswith("The following are multiple choice questions (with answers) about ")
        assert [" " + c for c in record["choices"]] == item.choices
        assert record["gold"] == item.credit.index(1.0)


def test_generative_and_partial_credit_tasks_are_refused(model_and_tasks, tmp_path):
    _, tasks = model_and_tasks
    write_jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "answer": "#### 4"}])
    (tmp_path / "g.yaml").write_text("data: g.jsonl\nlayout: gsm8k\n")
    with pytest.raises(UserError, match="covers multiple choice and cloze"):
        write_harness_task(load_tasks(str(tmp_path / "g.yaml"))[0], tmp_path)
    arc = tasks[1]
    arc.items[0].credit = [0.5, 0.5, 0.0]  # BIG-bench's target_scores may give part credit
    try:
        with pytest.raises(UserError, match="partial credit"):
            write_harness_task(arc, tmp_path)
    finally:
        arc.items[0].credit = [1.0, 0.0, 0.0]


def test_the_cross_check_command(model_and_tasks, capsys):
    model_dir, _ = model_and_tasks
    arc = model_dir.parent / "arc.yaml"
    assert main([str(model_dir), "--task", str(arc), "--limit", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("arc ")]
    assert [row[2] for row in rows] == ["acc", "acc_norm"] and all(row[3] == row[4] for row in rows)
    assert "item by item: the same" in out
    assert main([str(model_dir.parent / "nonesuch"), "--task", str(arc)]) == 2
    assert "no such directory" in capsys.readouterr().err
