"""The official openai client against a live server: chat, completions, streaming, stops, errors, load."""

import concurrent.futures

import httpx
import openai
import pytest

from commonlm.infer.generate import SamplingParams, generate_text
from tests.procs import LAST_RESORT_S, wait_for
from tests.serve.conftest import API_KEY


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=LAST_RESORT_S)


def greedy(server, prompt, n):
    return generate_text(server.lm.model, server.lm.tokenizer, prompt, SamplingParams(max_tokens=n, temperature=0))


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_local_generation(client, server):
    out = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=20, temperature=0)
    assert out.choices[0].text == greedy(server, "def f(x):", 20)
    assert out.usage.prompt_tokens == len("def f(x):") and out.usage.completion_tokens == 20
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion"


def test_streamed_completion_equals_the_whole(client):
    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0).choices[0].text
    pieces = list(client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole
    assert pieces[-1].choices[0].finish_reason == "length"


def test_chat_streaming_and_not(client, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0)
    prompt = server.lm.tokenizer.encode_chat(messages)
    assert full.choices[0].message.content == greedy(server, prompt, 25)
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    assert full.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings(client, server):
    text = greedy(server, "xyz", 60)
    stop = text[10:12]
    cut = text.index(stop)
    out = client.completions.create(model="tiny", prompt="xyz", max_tokens=60, temperature=0, stop=[stop, "\x00"])
    assert out.choices[0].text == text[:cut] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="xyz", max_tokens=60, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="seed", max_tokens=20, temperature=1.0, seed=42)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_32_concurrent_streams_are_independent_and_correct(client, server):
    prompts = [f"prompt number {i}: " for i in range(32)]

    def stream(prompt):
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outputs = list(pool.map(stream, prompts))
    assert outputs == [greedy(server, p, 24) for p in prompts]
    assert len(set(outputs)) > 16


def test_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="at most"):
        client.completions.create(model="tiny", prompt="a" * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="a", temperature=5)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": "hi"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"]
    r = httpx.post(server.url + "/v1/completions", content=b" " * 30_000, headers=headers)
    assert r.status_code == 413
    r = httpx.get(server.url + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def test_disconnect_frees_the_slot(server):
    engine = server.app.state.engine
    body = {"model": "tiny", "prompt": "long", "max_tokens": 200, "temperature": 0.9, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=LAST_RESORT_S) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    wait_for(lambda: engine.active == 0, "the slot to be freed", alive=server.thread.is_alive, interval=0.02)


def test_health_metrics_and_page(server, client):
    client.completions.create(model="tiny", prompt="m", max_tokens=3)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/metrics").status_code == 401  # behind the key
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'commonlm_requests_total{endpoint="completions",status="200"}' in metrics
    assert "commonlm_queue_depth" in metrics and "commonlm_time_to_first_token_seconds" in metrics
    page = httpx.get(server.url + "/").text
    assert "<title>CommonLM chat</title>" in page and "/v1/chat/completions" in page
