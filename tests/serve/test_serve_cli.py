"""`commonlm serve` as a user runs it: a subprocess that answers, finishes a request in flight when told to
stop (SIGTERM, as from a process manager, or Ctrl-C), and says so in one line when its port is taken."""

import json
import signal
import socket
import threading

import httpx
import pytest

from commonlm.infer.generate import SamplingParams, generate_text
from commonlm.modeldir import save_model_dir
from tests.procs import LAST_RESORT_S, commonlm_cmd, run_captured, running, started, wait_for
from tests.serve.conftest import tiny_lm

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(model_dir, port: int) -> list[str]:
    return commonlm_cmd("serve", model_dir, "--port", port, "--dtype", "fp32")


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:  # not listening yet, or too busy to answer within 5 s: ask again
        return False


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_answers_and_drains_on_stop(tmp_path, stop_signal):
    lm = tiny_lm()
    save_model_dir(tmp_path / "m", lm.model, lm.tokenizer, lm.config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would stall a server nobody reads
    with open(log, "w") as sink, started(serve_cmd(tmp_path / "m", port), stdout=sink, stderr=sink) as proc:
        wait_for(lambda: healthy(url), "the server's /health", running(proc), log=log)
        body = {"model": "m", "prompt": "def ", "max_tokens": 150, "temperature": 0, "stream": True}
        pieces, streaming = [], threading.Event()

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=LAST_RESORT_S) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
                        streaming.set()

        request = threading.Thread(target=stream, daemon=True)
        request.start()
        wait_for(streaming.is_set, "the first streamed piece", request.is_alive, log=log)
        proc.send_signal(stop_signal)  # while the answer is still streaming
        request.join(timeout=LAST_RESORT_S)
        assert proc.wait(timeout=LAST_RESORT_S) == 0, log.read_text()
    want = generate_text(lm.model, lm.tokenizer, "def ", SamplingParams(max_tokens=150, temperature=0))
    assert "".join(pieces) == want  # finished, not cut off by the stop


def test_serve_on_a_taken_port_says_so(tmp_path):
    lm = tiny_lm()
    save_model_dir(tmp_path / "m", lm.model, lm.tokenizer, lm.config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_captured(serve_cmd(tmp_path / "m", taken.getsockname()[1]))  # killed, whatever happens
    assert proc.returncode == 2, proc.stderr
    assert "port in use" in proc.stderr and "Traceback" not in proc.stderr
