# The few entry points the README names. Each creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve demo test lint unit browser docker docker-test bench uci models clean ray-extra ray-test bench-ray

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
	$(BIN)/hadolint Dockerfile

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

# dockerd and debootstrap for tests/test_docker.py, which starts a private engine of its own.
# A docker client alone (e.g. /usr/local/bin/docker) is not enough: the daemon is what counts,
# so docker.io (dockerd, containerd, runc and Debian's client) is installed when dockerd is
# missing and we are root with apt-get. Never fails `make test`; without them the tests skip.
docker:
	@missing=""; \
	command -v dockerd >/dev/null 2>&1 || missing=" docker.io"; \
	command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	if [ -z "$$missing" ]; then \
		echo "docker: dockerd and debootstrap are present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "docker: installing$$missing (apt-get) for the container tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing) \
			|| echo "docker: could not install $$missing; the container tests will be skipped"; \
	else \
		echo "docker: $$missing missing and not root with apt-get; the container tests will be skipped"; \
	fi

# The container suite alone: build the image in a private dockerd, run it, validate compose.
docker-test: docker $(STAMP)
	$(BIN)/pytest tests/test_docker.py tests/test_compose.py

# Ray tests (marker `ray`) in a loopback-only network namespace: Ray's start-up probes outside
# addresses, and nothing may leave the machine. Without Ray or unshare they skip, saying why.
RAY_STAMP := $(VENV)/.ray-installed
NETNS     := unshare -n sh -c 'ip link set lo up && exec "$$@"' sh
NETNS_ROOTLESS := unshare -rn sh -c 'ip link set lo up && exec "$$@"' sh

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,ray]' && touch $@ \
		|| echo "ray-extra: could not install '.[ray]'; the Ray tests will be skipped"

ray-extra: $(RAY_STAMP)

ray-test: ray-extra
	@if $(NETNS) true 2>/dev/null; then \
		$(NETNS) $(BIN)/pytest -m ray; \
	elif $(NETNS_ROOTLESS) true 2>/dev/null; then \
		$(NETNS_ROOTLESS) $(BIN)/pytest -m ray; \
	else \
		echo "ray-test: cannot make a loopback-only network namespace (unshare -n): Ray tests skip"; \
		$(BIN)/pytest -m ray; \
	fi

bench-ray: ray-extra  ## 1 vs 2 Ray Serve replicas, and Ray's proxy vs plain uvicorn
	$(NETNS) $(BIN)/python bench/ray_replicas.py

test: browser docker lint ray-extra unit ray-test

bench: $(STAMP)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/server.py
	$(BIN)/python bench/scale.py

UCI_FLAGS ?=
uci: $(STAMP)  ## the UCI regression table (docs/uci.md), data from ../shared/uci; UCI_FLAGS="--epochs-scale 100" for the authors' length
	$(BIN)/python bench/uci.py --compare-loop naval-propulsion-plant $(UCI_FLAGS)

models: $(STAMP)  ## regenerate the shipped demo models from scratch
	$(BIN)/python -m mcdrop.training.demo_models --out models

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
