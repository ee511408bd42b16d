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
	# torch stays pinned while the rest resolves: a newer torchvision would otherwise pull a newer (CUDA) torch.
	$(BIN)/pip install -q -e '.[test,bench]' torch==2.13.0
	touch $@

install: $(BIN)/.installed

run: install
	@echo "Flashtile: starting the cluster; requests to http://127.0.0.1:8000 (docs/api.md), metrics at http://127.0.0.1:8080/metrics. Ctrl-C stops it."
	$(BIN)/flashtile serve cluster.yaml --metrics-port 8080

# The tests start a real Prometheus server (Debian's package).
prometheus:
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)

test: install prometheus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every figure of docs/benchmarks.md (about 25 minutes on 2 cores); `python -m bench FIGURE [--quick]` runs one.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: install run test bench prometheus
