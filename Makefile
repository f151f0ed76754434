# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are lower bounds in setup.cfg; on machines with a local wheel store the pip
# configuration caps them there.
STAMP_TEST := $(VENV)/.installed-test
STAMP_DEMO := $(VENV)/.installed-demo
# Every extra that has tests, so that `make test` skips none of them (T2V_REQUIRE_EXTRAS=1 turns
# a skip for a missing optional module into a failure), plus the docs and lint tools.
TEST_EXTRAS := test,text,docs,lint
TEST_ENV := HF_HUB_OFFLINE=1 MPLBACKEND=Agg T2V_REQUIRE_EXTRAS=1

.PHONY: test test-all lint lint-check format-check demo docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_TEST): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e ".[$(TEST_EXTRAS)]"
	touch $@

$(STAMP_DEMO): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

# CI (.ci/run) runs `make test` and nothing else, so `make test` also runs all of `make lint`
# (ruff check, ruff format --check, mypy) after the tests.
test: $(STAMP_TEST)
	$(TEST_ENV) $(PY) -m pytest -q
	$(MAKE) --no-print-directory lint

test-all: $(STAMP_TEST)
	$(TEST_ENV) $(PY) -m pytest -q -m "slow or not slow"

# The static checks: ruff's lint rules, ruff's formatting and mypy (settings in pyproject.toml).
lint: lint-check format-check

lint-check: $(STAMP_TEST)
	$(PY) -m ruff check .
	$(PY) -m mypy t2v_lightning

format-check: $(STAMP_TEST)
	$(PY) -m ruff format --check .

# The documentation site, built offline into site/ (mkdocs.yml; every warning is an error).
docs: $(STAMP_TEST)
	NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m mkdocs build --strict --site-dir site

demo: $(STAMP_DEMO)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m t2v_lightning.demo

bench: $(STAMP_TEST)
	$(PY) bench/fisher_cost.py

clean:
	rm -rf $(VENV) demo_output site .pytest_cache .mypy_cache .ruff_cache
