# sasha — the two set-up commands are `make demo` and `make test`; each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
DEMO_DIR ?= demo-run

.PHONY: install demo test test-fast docs bench bench-scale bench-agents bench-predict lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch pulled by a dependency would be a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sasha demo $(DEMO_DIR)

test: $(STAMP)  # the whole suite, as CI runs it
	$(PY) -m pytest -q

test-fast: $(STAMP)  # without the heavier end-to-end tests (marked slow)
	$(PY) -m pytest -q -m "not slow"

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

# The documentation site (mkdocs.yml, pages under docs/, API reference from the docstrings),
# built strictly: a broken link or a docstring griffe cannot read fails the build. Output: site/
docs: $(DOCS_STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

bench: $(STAMP) bench-scale  # bench_predict builds its own cohort under bench-predict-run/ (resumable)
	$(PY) experiments/bench_extract.py
	$(PY) experiments/bench_predict.py --out bench-predict-run

# CAMELYON-sized slides: predict on the large preset's slides (> 10,000 patches, both modes),
# the env step at N = 512 / 2048 / 8192, agents' speed and memory up to N = 8192.
# Needs a finished demo workdir (made here when missing); writes bench-large/.
bench-scale: $(STAMP)
	test -f $(DEMO_DIR)/results.json || $(VENV)/bin/sasha demo $(DEMO_DIR)
	$(VENV)/bin/sasha synth bench-large --preset large
	$(PY) experiments/bench_predict.py --workdir $(DEMO_DIR) --slides-from bench-large/manifest.csv --slides 1
	$(PY) experiments/bench_env.py
	$(PY) experiments/bench_agent_speed.py

bench-agents: $(STAMP)   # needs a finished demo workdir (make demo)
	$(PY) experiments/bench_agents.py --workdir $(DEMO_DIR)

bench-predict: $(STAMP)  # the demo's 32-px patches; needs a finished demo workdir (make demo)
	$(PY) experiments/bench_predict.py --workdir $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

format: $(STAMP)
	$(VENV)/bin/ruff format src tests experiments
	$(VENV)/bin/ruff check --fix src tests experiments

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-predict-run bench-large .pytest_cache site
