"""`commonlm serve` as a user runs it: a subprocess that answers, finishes a request in flight when told to
stop (SIGTERM, as from a process manager, or Ctrl-C), and says so in one line when its port is taken."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from commonlm.infer.generate import SamplingParams, generate_text
from commonlm.modeldir import save_model_dir
from tests.serve.conftest import tiny_lm

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "commonlm", "serve", model_dir, "--port", str(port), "--dtype", "fp32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"server did not come up: {proc.communicate(timeout=10)}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_answers_and_drains_on_stop(tmp_path, stop_signal):
    lm = tiny_lm()
    save_model_dir(tmp_path / "m", lm.model, lm.tokenizer, lm.config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path / "m", port)
    try:
        wait_healthy(url, proc)
        body = {"model": "m", "prompt": "def ", "max_tokens": 150, "temperature": 0, "stream": True}
        pieces, started = [], threading.Event()

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
                        started.set()

        request = threading.Thread(target=stream)
        request.start()
        assert started.wait(timeout=60)
        proc.send_signal(stop_signal)  # while the answer is still streaming
        request.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    want = generate_text(lm.model, lm.tokenizer, "def ", SamplingParams(max_tokens=150, temperature=0))
    assert "".join(pieces) == want  # finished, not cut off by the stop


def test_serve_on_a_taken_port_says_so(tmp_path):
    lm = tiny_lm()
    save_model_dir(tmp_path / "m", lm.model, lm.tokenizer, lm.config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = start(tmp_path / "m", taken.getsockname()[1])
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "port in use" in err and "Traceback" not in err
