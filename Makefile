# One-command setup for a fresh machine. `make demo` and `make test` install what they need.
# PY: the Python to use. By default a project venv in .venv; pass PY=/path/to/python to use your own
# environment (your own torch is kept if it is a 2.13 release, see pyproject.toml).
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: setup browser demo chat-demo test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ "$(PY)" = "$(VENV)/bin/python" ] && [ ! -x "$(PY)" ]; then python3 -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	@$(MAKE) --no-print-directory browser
	@mkdir -p $(VENV) && touch $@

# The web chat page's test drives Debian's chromium; without it that one test is skipped (and says so).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		>/dev/null 2>&1) && echo "installed chromium for the browser test"; } || \
		echo "note: chromium is not installed; the browser test will be skipped"

demo: setup
	$(PY) -m commonlm quickstart --overwrite

# demo, then on to a chat model (fine-tuned on the standard library's docstrings): about 8 minutes
chat-demo: setup
	$(PY) -m commonlm quickstart --chat --overwrite

test: setup
	$(PY) -m pytest -n 2 -q

test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not slow"

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/cpu_speedrun.py
	$(PY) bench/data_prepare.py
	$(PY) bench/decode.py
	$(PY) bench/serve_throughput.py
	$(PY) bench/contention.py
	$(PY) bench/startup.py

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
