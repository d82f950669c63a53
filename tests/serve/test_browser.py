"""The chat page in a real headless browser (Debian's chromium driven by Playwright), under the page's own
Content-Security-Policy: it shows the model and its context, sends the conversation, streams the answer,
keeps max tokens within the context, and drops the oldest turns once the conversation no longer fits."""

import shutil

import pytest

from commonlm.serve.app import ServeSettings
from tests.procs import LAST_RESORT_S
from tests.serve.conftest import LiveServer

LIMIT_MS = LAST_RESORT_S * 1000  # Playwright counts milliseconds
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_chat_page_streams_answers_within_the_context():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser test cannot run here")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    expect = sync_api.expect
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    # the tiny model's context is 256 tokens, less than the page's default max tokens (256) plus any prompt
    with LiveServer(ServeSettings(model_name="tiny-web", api_key="k3y")) as live:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
            try:
                page = browser.new_page()
                blocked = []
                page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
                page.goto(live.url + "/")
                page.fill("#key", "k3y")
                page.dispatch_event("#key", "change")
                expect(page.locator("#model")).to_have_text("tiny-web · context 256", timeout=LIMIT_MS)
                expect(page.locator("#max_tokens")).to_have_value("128")  # clamped to half the context

                def say(text: str, answers: int) -> None:
                    page.fill("#input", text)
                    page.keyboard.press("Enter")
                    expect(page.locator(".msg.assistant")).to_have_count(answers, timeout=LIMIT_MS)
                    expect(page.locator("#send")).to_be_enabled(timeout=LIMIT_MS)

                say("hello there", 1)
                assert len(page.text_content(".msg.assistant .text")) > 0
                for turn in range(2, 5):  # 80-character messages: the conversation soon outgrows 256 tokens
                    say(f"message {turn}: " + "words " * 12, turn)
                assert page.locator(".msg.user").count() == 4
                assert page.locator(".msg.error").count() == 0, page.text_content(".msg.error")
                assert "no longer fit the context" in page.text_content(".msg.assistant:last-child .role")
                assert blocked == []  # the page's own script and style run under its policy
            finally:
                browser.close()
