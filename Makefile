# The README's two commands: `make run` (install, then start the Flashtile cluster) and `make test` (install, then run the suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/flashtile build-default
	@echo "Flashtile: starting the cluster; send requests to http://127.0.0.1:8000 (see README: API). Ctrl-C stops it."
	$(BIN)/serve run cluster.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.generate

.PHONY: install run test bench
