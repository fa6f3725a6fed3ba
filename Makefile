# Two commands on a fresh machine: `make demo` (stack + demo fine-tune) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo stack test lint bench vllm-venv
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

demo: setup
	$(PY) examples/demo.py

stack: setup
	$(PY) scripts/stack.py

test: setup
	$(PY) -m pytest -q -x --durations=15 tests

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/overhead.py

# The vLLM sampling venv, outside the repo ($TINKERBELL_VLLM_VENV); rebuilt only when its requirements change.
vllm-venv:
	scripts/vllm_venv.sh
