"""`commonlm chat` keeps a conversation, streams answers, and understands /reset and /quit."""

from commonlm.infer.generate import SamplingParams, generate_text
from commonlm.modeldir import save_model_dir
from tests.procs import commonlm_cmd, run_captured
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
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    first = generate_text(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0))
    answers = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]
    assert answers[0].startswith(first.split("\n")[0])
    assert answers[0] == answers[1]  # after /reset the same question gets the same (greedy) answer
