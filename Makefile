# Fresh machine: `make demo` (set up + run the embedded default) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo compare test test-slow bench-extract bench-train bench-toy clean

setup: $(STAMP)

# torch first, pinned: on a CPU-only machine with a local CPU wheel this avoids pulling the CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps 'lmms-eval>=0.7.3,<0.8'  # its deps as far as we use them: the lmms-core extra
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dualfocus demo dualfocus-demo

# Every connector on one store: the v2 toy corpus, the tiny models, one extract with every stream, then compare.
# Each step resumes (or is skipped when done), so an interrupted `make compare` continues where it stopped.
CMP ?= dualfocus-compare
DF := $(VENV)/bin/dualfocus
compare: setup
	test -f $(CMP)/toy/test_a.json || $(DF) toy-corpus $(CMP)/toy --kind v2 --videos 200 --seed 0
	test -f $(CMP)/tiny-model/config.json || $(DF) init-tiny $(CMP)/tiny-model --reading-steps 1000
	test -f $(CMP)/tiny-siglip/config.json || $(DF) init-tiny $(CMP)/tiny-siglip --family siglip
	test -f $(CMP)/tiny-dino/config.json || $(DF) init-tiny $(CMP)/tiny-dino --family dinov2
	$(DF) extract $(CMP)/toy/videos --out $(CMP)/store --model $(CMP)/tiny-model \
	  --encoder qavit=$(CMP)/tiny-model "encoders.qavit.taps.cut=hidden[1]" \
	  --encoder slowfast=$(CMP)/tiny-model "encoders.slowfast.taps.grid=grid@8x8" \
	  --encoder siglip=$(CMP)/tiny-siglip "encoders.siglip.taps.grid=grid@8x8" \
	  --encoder dino=$(CMP)/tiny-dino "encoders.dino.taps.grid=grid@8x8" --pixels 112
	$(DF) compare $(CMP)/store $(CMP)/toy/train.json $(CMP)/toy/test_q.json $(CMP)/toy/test_a.json \
	  --model $(CMP)/tiny-model --out $(CMP)/results --max-steps 1200 --batch-size 4

# Two pytest-xdist workers (one per core here); each test file stays on one worker so its module fixtures are
# built once, and files start in collection order (tests/conftest.py puts the longest first) rather than xdist's
# most-tests-first. TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: setup
	$(PY) -m pytest -q -m slow

bench-extract: setup
	$(PY) benchmarks/extract.py

bench-train: setup
	$(PY) benchmarks/train.py

bench-toy: setup
	$(PY) benchmarks/toy_learning.py

clean:
	rm -rf dualfocus-demo dualfocus-compare .pytest_cache
