# The two commands of the README. Both create .venv and install fqn into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fqn-installed

.PHONY: quickstart test test-fast lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/fqn quickstart

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15  # two workers, a file on one (pytest-xdist)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"  # the day-to-day tier: no end-to-end runs

lint: $(STAMP)
	$(VENV)/bin/ruff check fqn tests tools
