# sasha — the two set-up commands are `make demo` and `make test`; each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
DEMO_DIR ?= demo-run
# Every version `make` and CI install, torch's pin included: compiled from pyproject.toml's ranges
# by `make lock`. Users installing the package themselves (`pip install .`) still get the ranges.
CONSTRAINTS := requirements/constraints.txt
# The torch release `make lock` pins. Its CPU build: the PyPI wheel for Linux pulls a multi-GB
# CUDA stack (nvidia-*). LOCK_FIND_LINKS is a folder holding that CPU wheel; without one, uv
# takes it from PyTorch's CPU index (--torch-backend cpu).
TORCH_VERSION ?= 2.13.0
LOCK_FIND_LINKS ?= /opt/wheels
UV_VERSION := 0.13.9
# pytest-xdist workers for `make test` / `make test-fast`: one per core (at most 4), each
# computing with one thread (tests/conftest.py); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4

.PHONY: install lock demo test test-fast docs bench bench-scale bench-threads bench-agents bench-predict bench-demo bench-official lint format clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, at the constraints' pin (the CPU build): an unpinned torch pulled by a
	# dependency would be a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Re-resolve $(CONSTRAINTS) from pyproject.toml (extras dev and docs) for Python 3.11 on Linux
# x86_64, keeping the versions it already pins where the ranges allow (uv prefers them); delete
# the file first to take the newest releases. The CPU build's local label (+cpu) is dropped so
# that `torch==X` matches the CPU build and PyPI's alike.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet "uv==$(UV_VERSION)"
	printf 'torch==%s+cpu\n' "$(TORCH_VERSION)" > $(VENV)/torch-pin.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra docs \
	    --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	    -c $(VENV)/torch-pin.txt \
	    $(if $(wildcard $(LOCK_FIND_LINKS)/torch-$(TORCH_VERSION)+cpu-*.whl),--find-links $(LOCK_FIND_LINKS),--torch-backend cpu) \
	    --custom-compile-command "make lock  # see the Makefile" --quiet -o $(CONSTRAINTS)
	sed -i 's/^torch==$(TORCH_VERSION)+cpu$$/torch==$(TORCH_VERSION)/' $(CONSTRAINTS)
	! grep -nE '^(nvidia-|triton==)' $(CONSTRAINTS)

demo: $(STAMP)
	$(VENV)/bin/sasha demo $(DEMO_DIR)

test: $(STAMP)  # the whole suite, as CI runs it
	$(PYTEST)

test-fast: $(STAMP)  # without the heavier end-to-end tests (marked slow)
	$(PYTEST) -m "not slow"

$(DOCS_STAMP): $(STAMP) pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[docs]"
	touch $(DOCS_STAMP)

# The documentation site (mkdocs.yml, pages under docs/, API reference from the docstrings),
# built strictly: a broken link or a docstring griffe cannot read fails the build. Output: site/
docs: $(DOCS_STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

bench: $(STAMP) bench-scale bench-threads  # bench_predict builds its own cohort under bench-predict-run/ (resumable)
	$(PY) experiments/bench_extract.py
	$(PY) experiments/bench_predict.py --out bench-predict-run

# CAMELYON-sized slides: predict on the large preset's slides (> 10,000 patches, both modes),
# the env step at N = 512 / 2048 / 8192, agents' speed and memory up to N = 8192.
# Needs a finished demo workdir (made here when missing); writes bench-large/.
bench-scale: $(STAMP)
	test -f $(DEMO_DIR)/results.json || $(VENV)/bin/sasha demo $(DEMO_DIR)
	$(VENV)/bin/sasha synth bench-large --preset large
	$(PY) experiments/bench_predict.py --workdir $(DEMO_DIR) --slides-from bench-large/manifest.csv --slides 1
	$(PY) experiments/bench_predict_process.py --workdir $(DEMO_DIR) --slides-from bench-large/manifest.csv --rounds 1
	$(PY) experiments/bench_env.py
	$(PY) experiments/bench_agent_speed.py

# Two processes sharing the cores (as `sasha study --jobs 2` runs seeds): the evaluate stage of
# two copies of the demo workdir at once, OpenMP's spinning idle threads against sleeping ones.
bench-threads: $(STAMP)
	test -f $(DEMO_DIR)/results.json || $(VENV)/bin/sasha demo $(DEMO_DIR)
	$(PY) experiments/bench_idle_threads.py $(DEMO_DIR) $(DEMO_DIR)

# SashaVecEnv against 8 DummyVecEnvs (training steps/s, side by side; no workdir needed), then
# the RL algorithms on the demo workdir (needs a finished `make demo`).
bench-agents: $(STAMP)
	$(PY) experiments/bench_agent_speed.py --vec
	$(VENV)/bin/sasha benchmark --workdir $(DEMO_DIR) --algos maskable_ppo ppo ppo_unmasked a2c dqn \
		--seeds 0 1 2 --frac 0.1 --out $(DEMO_DIR)/benchmark

# `make demo` from scratch side by side: this checkout (--jobs auto) against itself with --jobs 1,
# alternating, two rounds (about 30 min on 2 cores); BASELINE=/path/to/checkout/src compares
# with another commit instead. Prints wall times, stage times, the ratio, identical results.
bench-demo: $(STAMP)
	$(PY) experiments/bench_demo.py --out bench-demo $(if $(BASELINE),--baseline $(BASELINE))

# The env step against the official SASHA code's (not shipped here: OFFICIAL=/path/to/a checkout
# of coglabiisc/SASHA), N = 8,192, one thread, side by side; also the optimiser benchmark.
bench-official: $(STAMP)
	@test -n "$(OFFICIAL)" || { echo "set OFFICIAL=/path/to/a checkout of coglabiisc/SASHA"; exit 2; }
	$(PY) experiments/bench_official_env.py --official $(OFFICIAL)
	$(PY) experiments/bench_optimizer.py

bench-predict: $(STAMP)  # the demo's 32-px patches; needs a finished demo workdir (make demo)
	$(PY) experiments/bench_predict.py --workdir $(DEMO_DIR)
	$(PY) experiments/bench_predict_process.py --workdir $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments
	$(VENV)/bin/mypy  # src/, configured in pyproject.toml [tool.mypy]

format: $(STAMP)
	$(VENV)/bin/ruff format src tests experiments
	$(VENV)/bin/ruff check --fix src tests experiments

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-predict-run bench-large bench-demo .pytest_cache .mypy_cache site
