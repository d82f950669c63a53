"""`commonlm chat` keeps a conversation, streams answers, understands /reset and /quit, keeps the conversation
within the model's context, and lets Ctrl-C stop a reply."""

import signal
import subprocess

import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.infer.generate import SamplingParams, generate_text
from commonlm.model.decoder import Decoder
from commonlm.modeldir import save_model_dir
from tests.procs import LAST_RESORT_S, commonlm_cmd, run_captured, started
from tests.serve.conftest import tiny_lm


def test_terminal_chat(tmp_path):
    lm = tiny_lm()
    save_model_dir(tmp_path / "m", lm.model, lm.tokenizer, lm.config)
    script = "hello\n/reset\nhello\nand then?\n/quit\nnever read\n"
    proc = run_captured(
        commonlm_cmd("chat", tmp_path / "m", "--dtype", "fp32", "--temperature", "0", "--max-tokens", "12"),
        input=script,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("model> ") == 3 and "(history cleared)" in out
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    first = generate_text(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0))
    answers = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]
    assert answers[0].startswith(first.split("\n")[0])
    assert answers[0] == answers[1]  # after /reset the same question gets the same (greedy) answer


def test_terminal_chat_drops_the_oldest_turns_when_the_context_is_full(tmp_path):
    lm = tiny_lm()  # a context of 256 tokens; each message below takes ~90 of them, a reply up to 128
    save_model_dir(tmp_path / "m", lm.model, lm.tokenizer, lm.config)
    script = "".join(f"message {i}: {'words ' * 12}\n" for i in range(4)) + "/quit\n"
    proc = run_captured(commonlm_cmd("chat", tmp_path / "m", "--dtype", "fp32", "--temperature", "0",
                                     "--max-tokens", "1000", "--system", "be brief"), input=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 4
    assert "oldest messages to fit the context of 256 tokens" in proc.stdout
    replies = [line.split("model> ", 1)[1] for line in proc.stdout.splitlines() if "model> " in line]
    assert all(len(r) > 20 for r in replies), replies  # not shrunk to a few characters


def test_ctrl_c_stops_the_reply_not_the_chat(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=128, vocab_size=320,
                         max_seq_len=16384)
    model = Decoder(config).eval()
    with torch.no_grad():
        model.embed.weight.mul_(3)
        model.embed.weight[256:].zero_()  # (tied) logit 0 for every control token: the reply never ends by itself
    tok = Tokenizer.byte_level()
    save_model_dir(tmp_path / "m", model, tok, RunConfig(model=config))
    with started(commonlm_cmd("chat", tmp_path / "m", "--dtype", "fp32", "--temperature", "0", "--max-tokens",
                              "16000"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        seen = b""
        while not seen.endswith(b"model> "):
            byte = proc.stdout.read(1)
            assert byte, proc.stderr.read().decode()
            seen += byte
        proc.stdout.read(1)  # the reply has begun
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/quit\n", timeout=LAST_RESORT_S)
    assert proc.returncode == 0, err.decode()
    assert b" [stopped]\n" in out and out.rstrip().endswith(b"you>")
