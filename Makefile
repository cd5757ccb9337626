# One command for each thing a newcomer does. Each target sets up .venv first if needed.
#   make demo    set up, then run the demo federation: a server and 4 phantom sites as separate
#                processes over gRPC with mutual TLS on loopback (CPU, about 5 minutes)
#   make test    set up, then run every check: ruff, mypy, then pytest (CI runs exactly this)
#   make bench   set up, then run the benchmarks (JSON in runs/bench/)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch. On a GPU machine install your CUDA build of torch into .venv
# first and run `make demo TORCH_SPEC=torch` (an installed torch then satisfies it).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedbone-installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,plots]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@# an earlier demo's results, checkpoints and audit logs are kept, moved aside
	@if [ -e runs/demo ]; then mv runs/demo runs/demo.$$(date +%Y%m%dT%H%M%S) && echo "earlier runs/demo moved aside"; fi
	$(BIN)/fedbone run pipelines/demo.toml --transport grpc --out runs/demo

lint: setup
	$(BIN)/ruff check fedbone_med tests benchmarks
	$(BIN)/mypy fedbone_med

# One torch thread per test process: the suite's models are small, and two threads on two cores
# shared with any other job make torch's parallel regions wait on each other (runs 10x slower).
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/aggregation.py --out runs/bench/aggregation.json
	$(BIN)/python benchmarks/split_step.py --out runs/bench/split_step.json
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/audit.py --out runs/bench/audit.json
	$(BIN)/python benchmarks/pipeline.py --out runs/bench/pipeline.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
