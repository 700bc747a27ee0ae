# Fresh machine: `make demo` (set up + run the embedded default) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench-extract bench-train bench-toy clean

setup: $(STAMP)

# torch first, pinned: on a CPU-only machine with a local CPU wheel this avoids pulling the CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dualfocus demo dualfocus-demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench-extract: setup
	$(PY) benchmarks/extract.py

bench-train: setup
	$(PY) benchmarks/train.py

bench-toy: setup
	$(PY) benchmarks/toy_learning.py

clean:
	rm -rf dualfocus-demo .pytest_cache
