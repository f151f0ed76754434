# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are lower bounds in setup.cfg; on machines with a local wheel store the pip
# configuration caps them there.
STAMP_TEST := $(VENV)/.installed-test
STAMP_DEMO := $(VENV)/.installed-demo

.PHONY: test test-all demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_TEST): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(STAMP_DEMO): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

test: $(STAMP_TEST)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -q

test-all: $(STAMP_TEST)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -q -m "slow or not slow"

demo: $(STAMP_DEMO)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m t2v_lightning.demo

bench: $(STAMP_TEST)
	$(PY) bench/fisher_cost.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
