# The few entry points the README names. Each creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve demo test lint unit bench models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)  ## serve the shipped models on http://127.0.0.1:8000 (API docs at /docs)
	$(BIN)/mcdrop serve --model-repository models --host 127.0.0.1 --port 8000

demo: $(STAMP)  ## print predictions of the shipped models, without a server
	$(BIN)/mcdrop demo --model-repository models

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint unit

bench: $(STAMP)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/server.py

models: $(STAMP)  ## regenerate the shipped demo models from scratch
	$(BIN)/python -m service.demo_models --out models

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
