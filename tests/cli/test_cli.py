"""The command line end to end, as a user types it, and its answers to bad input."""

import os
import subprocess

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


# -- bad input answered in one line, also by the Python API (in this process: torch is imported once) -------


@pytest.fixture
def cli(capsys):
    """`commonlm ARGS` run by main() in this process, as a CompletedProcess (generate's grad mode restored)."""
    import torch

    from commonlm.cli import main

    def run(*args):
        grad = torch.is_grad_enabled()
        try:
            status = main([str(a) for a in args])
        finally:
            torch.set_grad_enabled(grad)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out.out, out.err)

    return run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model directory with random weights: a 32-token context, a byte tokenizer."""
    import torch

    from commonlm.config import ModelConfig, RunConfig
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.model.decoder import Decoder
    from commonlm.modeldir import save_model_dir

    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=320, max_seq_len=32)
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "model", Decoder(config), Tokenizer.byte_level(),
                          RunConfig(model=config))


@pytest.mark.parametrize("flags, needle", [
    (["--top-k", -3], "top_k=-3 (--top-k) must be >= 0"),  # was a traceback from torch.topk
    (["--temperature", -1], "temperature=-1.0 (--temperature) must be >= 0"),  # was silently greedy
    (["--top-p", 1.5], "top_p=1.5 (--top-p) must be in (0, 1]"),  # was accepted
    (["--top-p", 0], "top_p=0.0 (--top-p) must be in (0, 1]"),
    (["--max-tokens", 0], "max_tokens=0 (--max-tokens) must be at least 1"),
    (["--max-tokens", -5], "max_tokens=-5"),
    (["--num-samples", 0], "--num-samples 0 must be at least 1"),
])
def test_generate_refuses_bad_sampling_values(cli, tiny_model, flags, needle):
    assert_one_line_error(cli("generate", tiny_model, *flags), needle)


def test_an_error_shows_the_users_words_as_written(cli, tiny_model):
    """The message is not read as rich markup: `:abc:` is not an emoji code, `[bold]` not a style."""
    assert_one_line_error(cli("eval", tiny_model, "--task", "passkey:abc:[bold]"), "--task passkey:abc:[bold]:")


def test_the_python_api_refuses_the_same_sampling_values(tiny_model):
    from commonlm.api import load
    from commonlm.errors import UserError

    m = load(tiny_model, device="cpu")
    with pytest.raises(UserError, match=r"top_k=-3 \(--top-k\) must be >= 0"):
        m.generate("a", top_k=-3)
    with pytest.raises(UserError, match="temperature"):
        list(m.stream("a", temperature=-0.5))


def test_an_empty_prompt_starts_a_text_and_long_outputs_say_where_they_stop(cli, tiny_model):
    from commonlm.api import load
    from commonlm.infer.generate import start_id, stream_ids

    proc = cli("generate", tiny_model, "--prompt", "", "--max-tokens", 100000, "--temperature", 0, "--dtype", "fp32")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr  # an empty prompt was a traceback
    assert "note: --max-tokens 100000 cut to 32: the model's context is 32 tokens and the prompt takes 1" in proc.stderr
    m = load(tiny_model, device="cpu")  # the note's count is what decoding gives
    assert start_id(m.tokenizer) == m.tokenizer.eot_id  # no bos token: end-of-text stands before every document
    assert len(list(stream_ids(m.model, [start_id(m.tokenizer)], max_tokens=100000, stop_ids=()))) == 32
    assert "note:" not in cli("generate", tiny_model, "--prompt", "ab", "--max-tokens", 31).stderr
    assert "cut to 31" in cli("generate", tiny_model, "--prompt", "ab", "--max-tokens", 32).stderr


def test_tokenizer_train_never_silently_replaces_a_tokenizer(cli, tmp_path, tiny_model):
    corpus = synthetic_corpus(tmp_path / "corpus", n_docs=5)
    tok = tmp_path / "tok"
    assert cli("tokenizer", "train", "--kind", "byte", "--input", corpus, "--out", tok).returncode == 0
    before = (tok / "tokenizer.json").read_text()
    assert_one_line_error(cli("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tok),
                          "tokenizer.json already exists", "--overwrite")
    assert (tok / "tokenizer.json").read_text() == before
    replaced = cli("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tok, "--overwrite")
    assert replaced.returncode == 0
    assert (tok / "tokenizer.json").read_text() != before
    # a model directory's tokenizer belongs to its weights: not even --overwrite replaces it
    before = (tiny_model / "tokenizer.json").read_text()
    assert_one_line_error(cli("tokenizer", "train", "--input", corpus, "--out", tiny_model, "--overwrite"),
                          "holds commonlm.yaml", "choose another --out")
    assert (tiny_model / "tokenizer.json").read_text() == before


def test_tokenizer_vocab_size_limits_are_said(cli, tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus", n_docs=5)
    proc = cli("tokenizer", "train", "--input", corpus, "--vocab-size", 10**9, "--out", tmp_path / "a")
    assert_one_line_error(proc, "--vocab-size 1000000000 is too large", "16,777,216")  # was a Rust abort
    proc = cli("tokenizer", "train", "--input", corpus, "--vocab-size", 100000, "--out", tmp_path / "b")
    assert proc.returncode == 0
    assert "note: asked for 100000 tokens, but the corpus only supports" in proc.stderr


def test_a_model_with_a_replaced_tokenizer_is_refused(cli, tmp_path, tiny_model):
    """A bigger tokenizer.json in a model directory made generate crash with an IndexError."""
    import shutil

    from commonlm.data.tokenizer import Tokenizer

    shutil.copytree(tiny_model, tmp_path / "model")
    bigger = Tokenizer.byte_level()
    bigger.tk.add_tokens([f"w{i}" for i in range(100)])
    bigger.save(tmp_path / "model")
    assert_one_line_error(cli("generate", tmp_path / "model"), "the tokenizer has 364 tokens",
                          "the model embeds only 320")


def test_export_checks_its_output_first(cli, tmp_path, tiny_model):
    (tmp_path / "model.gguf").write_text("mine")
    assert_one_line_error(cli("export", tiny_model, "--format", "gguf", "--out", tmp_path / "model.gguf"),
                          "already exists", "--overwrite")
    assert (tmp_path / "model.gguf").read_text() == "mine"
    (tmp_path / "dir").mkdir()  # was a crash after the work, leaving a temp file behind
    assert_one_line_error(cli("export", tiny_model, "--format", "onnx", "--out", tmp_path / "dir"), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "model.gguf"]


def test_several_values_per_set_and_debug_after_the_verb(cli, tmp_path, prepared):
    from commonlm.errors import UserError

    args = ("train", "--config", "tiny", "--data", prepared / "data", "--out", tmp_path / "r",
            "--set", "train.lr=1e-3", "train.lrr=1")  # the form README shows; was 'unrecognized arguments'
    assert_one_line_error(cli(*args), "unknown key 'train.lrr'")
    with pytest.raises(UserError, match="train.lrr"):  # --debug after the verb: the traceback, not one line
        cli(*args, "--debug")


def test_resume_on_other_data_and_init_from_a_run(cli, tmp_path, prepared):
    run, corpus = tmp_path / "run", prepared / "corpus"
    assert cli("train", "--config", "tiny", "--data", prepared / "data", "--out", run,
               *sets(*SMALL, "train.max_steps=4"), "--stop-at-step", 2).returncode == 0
    cli("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tmp_path / "bpe")
    cli("data", "prepare", "--input", corpus, "--tokenizer", tmp_path / "bpe", "--out", tmp_path / "bpe-data",
        "--workers", 1)
    # 300 BPE tokens fit the run's 320 rows: this trained on, silently (more tokens gave advice on vocab_size=0)
    assert_one_line_error(cli("train", "--resume", run, "--data", tmp_path / "bpe-data"),
                          "was prepared with another tokenizer than the run's", "--tokenizer")
    # --init takes a run directory, as every other verb does; data with no validation split is warned about
    cli("data", "prepare", "--input", corpus, "--tokenizer", prepared / "tok", "--out", tmp_path / "no-val",
        "--val-fraction", 0, "--workers", 1)
    proc = cli("train", "--init", run, "--data", tmp_path / "no-val", "--out", tmp_path / "run2",
               *sets(*SMALL, "train.max_steps=1"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: " + str(tmp_path / "no-val") + " has no validation split" in proc.stderr


def test_help_shows_every_default():
    import argparse

    from commonlm.cli import build_parser

    def verbs(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, child in action.choices.items():
                    yield from verbs(child, f"{name} {verb}")
        yield name, parser

    for name, parser in verbs(build_parser(), "commonlm"):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = action.help and "default" in action.help or f"(default: {action.default})" in text
                assert shown, f"{name} {action.option_strings[0]}"
