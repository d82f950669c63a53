"""The command line end to end, as a user types it, and its answers to bad input."""

import os

import pytest

from commonlm.train.checkpoint import latest_checkpoint
from tests.conftest import synthetic_corpus
from tests.procs import commonlm_cmd, run_captured

SMALL = ["model.n_layer=2", "model.d_model=64", "model.max_seq_len=32", "train.micro_batch_size=4",
         "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4", "train.threads=1", "train.warmup_steps=2"]


def commonlm(*args, cwd=None, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = run_captured(commonlm_cmd(*args), cwd=cwd, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_prepare_train_resume_eval_generate(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")
    commonlm("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tmp_path / "tok")
    commonlm("data", "prepare", "--input", corpus, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "data",
             "--val-fraction", 0.1)
    run = tmp_path / "run"
    first = commonlm("train", "--config", "tiny", "--data", tmp_path / "data", "--out", run,
                     *sets(*SMALL, "train.max_steps=12"), "--stop-at-step", 4)
    assert "resume with" in first.stderr and latest_checkpoint(run).name == "step_000004"
    second = commonlm("train", "--resume", run)
    assert "resume   from" in second.stderr and (run / "final" / "model.safetensors").is_file()
    assert "step 12/12" in second.stderr

    evaluated = commonlm("eval", run, "--data", tmp_path / "data")
    assert "val: loss" in evaluated.stdout and "bits/byte" in evaluated.stdout
    sample = commonlm("generate", run, "--prompt", "def ", "--max-tokens", 20, "--seed", 3)
    again = commonlm("generate", run / "final", "--prompt", "def ", "--max-tokens", 20, "--seed", 3)
    assert sample.stdout.startswith("def ") and sample.stdout == again.stdout
    assert commonlm("generate", run, "--prompt", "def ", "--max-tokens", 20, "--seed", 4).stdout != sample.stdout
    greedy = ("generate", run, "--prompt", "def ", "--max-tokens", 20, "--temperature", 0, "--dtype", "fp32")
    assert commonlm(*greedy, "--compile").stdout == commonlm(*greedy).stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = synthetic_corpus(root / "corpus", n_docs=20)
    commonlm("tokenizer", "train", "--kind", "byte", "--input", corpus, "--out", root / "tok")
    commonlm("data", "prepare", "--input", corpus, "--tokenizer", root / "tok", "--out", root / "data")
    return root


def test_missing_input(tmp_path):
    proc = commonlm("tokenizer", "train", "--input", tmp_path / "nope", "--out", tmp_path / "tok", check=False)
    assert_one_line_error(proc, "nope")


def test_empty_input_directory(tmp_path, prepared):
    (tmp_path / "empty").mkdir()
    proc = commonlm("data", "prepare", "--input", tmp_path / "empty", "--tokenizer", prepared / "tok",
                    "--out", tmp_path / "data", check=False)
    assert_one_line_error(proc, "no documents")
    assert not (tmp_path / "data").exists()


def test_existing_output_is_not_overwritten(tmp_path, prepared):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    proc = commonlm("data", "prepare", "--input", prepared / "corpus", "--tokenizer", prepared / "tok",
                    "--out", tmp_path / "data", check=False)
    assert_one_line_error(proc, "--overwrite")
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"


def test_corpus_smaller_than_one_context_window(tmp_path, prepared):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("tiny corpus")
    commonlm("data", "prepare", "--input", tmp_path / "small", "--tokenizer", prepared / "tok",
             "--out", tmp_path / "data", "--val-fraction", 0)
    proc = commonlm("train", "--config", "tiny", "--data", tmp_path / "data", "--out", tmp_path / "run",
                    *sets(*SMALL), check=False)
    assert_one_line_error(proc, "fewer than one window", "seq_len")


def test_tokenizer_data_mismatch(tmp_path, prepared):
    run = tmp_path / "run"
    commonlm("train", "--config", "tiny", "--data", prepared / "data", "--out", run, *sets(*SMALL, "train.max_steps=2"))
    corpus = prepared / "corpus"
    commonlm("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tmp_path / "bpe")
    commonlm("data", "prepare", "--input", corpus, "--tokenizer", tmp_path / "bpe", "--out", tmp_path / "bpe-data")
    proc = commonlm("eval", run, "--data", tmp_path / "bpe-data", check=False)
    assert_one_line_error(proc, "tokenizer")


def test_unknown_preset_and_out_of_range_setting(tmp_path, prepared):
    proc = commonlm("train", "--config", "gpt7", "--data", prepared / "data", "--out", tmp_path / "r", check=False)
    assert_one_line_error(proc, "gpt7", "presets:")
    proc = commonlm("train", "--config", "tiny", "--data", prepared / "data", "--out", tmp_path / "r",
                    "--set", "train.lr=-1", check=False)
    assert_one_line_error(proc, "train.lr")
    proc = commonlm("train", "--config", "tiny", "--data", prepared / "data", "--out", tmp_path / "r",
                    "--set", "train.lrr=1", check=False)
    assert_one_line_error(proc, "train.lrr")
    assert not (tmp_path / "r").exists()


def test_corrupt_checkpoint(tmp_path, prepared):
    run = tmp_path / "run"
    commonlm("train", "--config", "tiny", "--data", prepared / "data", "--out", run,
             *sets(*SMALL, "train.max_steps=8"), "--stop-at-step", 4)
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = commonlm("train", "--resume", run, check=False)
    assert_one_line_error(proc, "corrupt", "earlier checkpoint")
    assert_one_line_error(commonlm("eval", run, "--data", prepared / "data", check=False), "corrupt")


def test_debug_shows_the_traceback(tmp_path):
    proc = commonlm("--debug", "train", "--config", "gpt7", "--out", tmp_path / "r", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_lists_every_verb():
    out = commonlm("--help").stdout
    for verb in ("tokenizer", "data", "train", "eval", "generate", "quickstart", "presets"):
        assert verb in out
