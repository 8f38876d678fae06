# MARA Serve — every target sets up what it needs on a fresh machine.
#   make serve   create .venv, fetch the default model, run the server on 127.0.0.1:8000
#   make test    create .venv, fetch the default model, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv model serve test test-core lint bench bench-quick bench-peers bench-gpu fuzz load soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

model: venv
	$(BIN)/mara fetch-default

serve: model
	$(BIN)/mara serve $(ARGS)

test: model
	$(BIN)/pytest $(PYTEST_ARGS)

test-core: venv
	$(BIN)/pytest tests/core $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: model
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/serve.py

bench-quick: model
	$(BIN)/python bench/decode.py --quick
	$(BIN)/python bench/serve.py --quick

bench-peers: model
	$(BIN)/python bench/peers.py $(ARGS)

bench-gpu: model
	$(BIN)/python bench/gpu.py $(ARGS)

fuzz: model
	$(BIN)/python bench/fuzz.py $(ARGS)

load: model
	$(BIN)/python bench/load.py $(ARGS)

soak: model
	$(BIN)/python bench/soak.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
