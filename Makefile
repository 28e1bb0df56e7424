# Everything a fresh machine needs (Python 3.10+, git, make) is installed from here.
# `make demo` runs the whole pipeline; `make test` runs the suite (what CI runs).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned on the install path: a CPU build of 2.13.0 (an unpinned torch
# pulls a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint prometheus clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lookalike run

# Debian's prometheus package gives the tests promtool and a real Prometheus
# server to scrape the workers; skipped (tests then skip, saying why) where
# there is no apt-get.
prometheus:
	@if ! command -v promtool >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "no apt-get: Prometheus tests will be skipped"; fi; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: setup prometheus lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
