# The few entry points the README names. Each creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve demo test lint unit browser bench uci models clean

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

# Debian's chromium for tests/test_dashboard_browser.py (python playwright drives it; never
# `playwright install`). Installed when missing and we can (root with apt-get); otherwise those
# tests skip with the reason. This step never fails `make test`.
browser:
	@if [ -x /usr/bin/chromium ]; then \
		echo "browser: /usr/bin/chromium is present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "browser: installing Debian's chromium (apt-get) for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "browser: could not install chromium; the browser tests will be skipped"; \
	else \
		echo "browser: /usr/bin/chromium missing and not root with apt-get; the browser tests will be skipped"; \
	fi

test: browser lint unit

bench: $(STAMP)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/server.py

uci: $(STAMP)  ## the UCI regression table (docs/uci.md), data from ../shared/uci
	$(BIN)/python bench/uci.py --compare-loop naval-propulsion-plant

models: $(STAMP)  ## regenerate the shipped demo models from scratch
	$(BIN)/python -m service.demo_models --out models

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
