"""The chat page in a real headless browser (Debian's chromium driven by Playwright): it shows the model,
sends the conversation, and streams the answer into the page."""

import shutil

import pytest

from commonlm.serve.app import ServeSettings
from tests.procs import LAST_RESORT_S
from tests.serve.conftest import LiveServer

LIMIT_MS = LAST_RESORT_S * 1000  # Playwright counts milliseconds
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_chat_page_streams_an_answer():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser test cannot run here")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with LiveServer(ServeSettings(model_name="tiny-web", api_key="k3y", max_tokens=64)) as live:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
            try:
                page = browser.new_page()
                page.goto(live.url + "/")
                page.fill("#key", "k3y")
                page.dispatch_event("#key", "change")
                page.wait_for_function("document.querySelector('#model').textContent === 'tiny-web'", timeout=LIMIT_MS)
                page.fill("#max_tokens", "20")
                page.fill("#input", "hello there")
                page.keyboard.press("Enter")
                page.wait_for_function(
                    "document.querySelectorAll('.msg.assistant .text').length === 1 &&"
                    "document.querySelector('.msg.assistant .text').textContent.length > 0 &&"
                    "!document.querySelector('#send').disabled", timeout=LIMIT_MS)
                first = page.text_content(".msg.assistant .text")
                page.fill("#input", "and again")
                page.click("#send")
                page.wait_for_function("document.querySelectorAll('.msg.assistant .text').length === 2 &&"
                                       "!document.querySelector('#send').disabled", timeout=LIMIT_MS)
                assert page.locator(".msg.user").count() == 2
                assert page.locator(".msg.error").count() == 0
                assert len(first) > 0
            finally:
                browser.close()
