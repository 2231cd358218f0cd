# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv with the pinned stack if missing, run the quickstart
#   make test   - create .venv with the pinned stack if missing, run the test suite
# The interpreter for a new .venv: python3.11 (the tested one), else python3 if it is 3.10 or
# newer (requires-python); `make PYTHON=/path/to/python3.12 ...` chooses another.
ifndef PYTHON
PYTHON := $(shell command -v python3.11 2>/dev/null || { python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && command -v python3; })
endif
VENV   ?= .venv
# The tested stack (torch 2.14.1 brings triton 3.8). Runtime requirements in pyproject.toml
# are looser: no older than what was tested.
STACK  := torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint gpu-test gpu-validate gpu-validate-dry-run gpu-stack test-gpu-stack aot \
	aot-gate env docs clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || test -n "$(PYTHON)" || { echo "make: found neither python3.11 nor a python3 >= 3.10; run make PYTHON=/path/to/python3.X" >&2; exit 1; }
	@test -x $(BIN)/python || echo "make: creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version 2>&1))"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(STACK)
	$(BIN)/python -m pip install -q -e ".[dev,bench,examples]"
	touch $@

demo: env
	$(BIN)/python examples/quickstart.py

# CI's test command: everything but `slow` runs and GPU tests (those skip without CUDA).
test: env
	$(BIN)/python -m pytest -m "not slow" --doctest-modules music_loss tests $(PYTEST_ARGS)

# mypy reads the installed layout (kernels/ as music_loss.kernels: neither the source tree
# nor the editable install shows mypy that mapping), and the tooling in benchmarks/ that
# imports the kernels.
lint: env
	$(BIN)/ruff check .
	rm -rf .lint-site build  # a stale build/ would add the files of an earlier layout
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation --target .lint-site .
	MYPYPATH=.lint-site $(BIN)/mypy -p music_loss -m benchmarks.aot -m benchmarks.profile \
		-m benchmarks.plan

# On a GPU machine (no internet): pip install --no-build-isolation --no-deps -e . first.
# No -x: a CPU-side failure must not stop the GPU tests behind it.
GPU_PYTHON ?= python3
gpu-test:
	$(GPU_PYTHON) -m pytest -m "gpu or slow or not slow" tests -q -rs

# The whole GPU validation, one rerunnable command (~8 min on one H100; results under
# benchmarks/results/gpu-validate-<card>-<date>/). CI runs the dry run (CPU, interpreter).
gpu-validate:
	$(GPU_PYTHON) -m benchmarks.gpu_validate $(GPU_VALIDATE_ARGS)

gpu-validate-dry-run: env
	$(BIN)/python -m benchmarks.gpu_validate --dry-run --out $(or $(DRY_RUN_OUT),/tmp/music-loss-gpu-validate-dry-run) --fresh

# The oldest supported stack (Python 3.12, torch 2.11, torchvision 0.26, triton 3.6) here, on
# CPU: the kernel and core tests under those versions (interpreter for the kernels), the AOT
# compile check and static gate included (python -m benchmarks.aot under triton 3.6).
GPU_STACK ?= .venv-gpu-stack
GPU_STACK_TESTS ?= tests/kernels tests/test_backends.py tests/test_reference.py \
	tests/test_errors.py tests/test_compile.py
gpu-stack: $(GPU_STACK)/.installed

$(GPU_STACK)/.installed: pyproject.toml
	../shared/tools/gpu-stack-venv $(GPU_STACK)
	touch $@

test-gpu-stack: gpu-stack
	$(GPU_STACK)/bin/python -m pytest -m "not slow" -q -rs -p no:cacheprovider \
		$(GPU_STACK_TESTS) $(PYTEST_ARGS)

# The docs site (mkdocs.yml, docs/) into site/; --strict: a broken link or reference fails.
# NO_MKDOCS_2_WARNING silences a release notice of mkdocs-material, not a build warning.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

# The compile check for every architecture (sm_75 to sm_120; AOT_ARCHS to narrow it).
AOT_ARCHS ?= 75 80 86 89 90 100 120
aot: env
	env -u TRITON_INTERPRET $(BIN)/python -m benchmarks.aot --arch $(AOT_ARCHS)

# The compile check with its static gate (exit 1 on a regression), the table kept as JSON.
AOT_JSON ?= /tmp/music-loss-aot.json
aot-gate: env
	env -u TRITON_INTERPRET $(BIN)/python -m benchmarks.aot --arch $(AOT_ARCHS) \
		--json $(AOT_JSON) --jobs 2

clean:
	rm -rf $(VENV) build dist site *.egg-info
