# One-command setup for a fresh machine. `make demo` and `make test` install what they need.
# PY: the Python to use. By default a project venv in .venv; pass PY=/path/to/python to use your own
# environment (your own torch is kept).
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ "$(PY)" = "$(VENV)/bin/python" ] && [ ! -x "$(PY)" ]; then python3 -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	@mkdir -p $(VENV) && touch $@

demo: setup
	$(PY) -m commonlm quickstart --overwrite

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

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
