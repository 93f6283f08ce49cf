# make demo: install, then run the main job on the built-in small model.
# make test: install, then run the test suite.
# torch comes from the CPU release on this machine's disk (never a multi-GB CUDA download).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
WHEELS := /opt/wheels
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --find-links $(WHEELS) "torch==2.13.0"
	$(PIP) install --find-links $(WHEELS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m snlp_compile.demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
