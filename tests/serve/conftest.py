"""A live server on 127.0.0.1 (a free port) in a background thread, serving a tiny random model."""

import socket
import threading
from pathlib import Path

import pytest
import torch
import uvicorn

from commonlm.api import LanguageModel
from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.infer.engine import Engine
from commonlm.model.decoder import Decoder
from commonlm.serve.app import ServeSettings, create_app, server_config
from tests.procs import wait_for

API_KEY = "test-key-123"


def tiny_lm() -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=320,
                         max_seq_len=256)
    model = Decoder(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # peaky distributions: different prompts give different greedy text
    return LanguageModel(model, Tokenizer.byte_level(), RunConfig(model=config), Path("tiny"))


class LiveServer:
    def __init__(self, settings: ServeSettings, lm: LanguageModel | None = None, run_engine: bool = True):
        """run_engine=False: the engine takes requests but decodes nothing until the test calls
        `live.engine.start()` (to look at queues and slots without racing it)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.lm = lm or tiny_lm()
        engine = None if run_engine else Engine(self.lm.model, max_batch=settings.max_batch)
        self.app = create_app(self.lm, settings, engine)
        self.engine = self.app.state.engine
        self.server = uvicorn.Server(server_config(self.app, "127.0.0.1", self.port, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, "uvicorn to start", alive=self.thread.is_alive, interval=0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.engine.stop()  # ours when run_engine=False (the app stops its own)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    settings = ServeSettings(model_name="tiny", api_key=API_KEY, max_batch=8, max_tokens=200, max_body_bytes=20_000,
                             timeout_s=60)
    with LiveServer(settings) as live:
        yield live
