# Two commands for a new user: `make demo` (the tiny CPU LUFFY demo) and `make test` (the test suite).
# Both create and reuse a local virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
MEGATRON_VERSION ?= 0.19.2
# The `sglang` test tier: the real SGLang server and sglang-router (the versions setup.py's [gpu] extra pins) in an
# environment of their own, on SGLang's CPU engine (tests/sglang_cpu/README.md).
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_STAMP := $(SGLANG_VENV)/.installed
SGLANG_VERSION ?= 0.5.23
SGLANG_ROUTER_VERSION ?= 0.3.2
export OMP_NUM_THREADS ?= 2

.PHONY: venv sglang-venv demo test test-fast lint clean gpu-check

venv: $(STAMP)
sglang-venv: $(SGLANG_STAMP)

# torch first and pinned (a CPU wheel; a resolver must never pull another build), then megatron-core without its
# Requires-Python check (0.17+ declares >=3.12 but runs on 3.11), then the package and its test tools.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-deps --ignore-requires-python megatron-core==$(MEGATRON_VERSION)
	$(PY) -m pip install -q -e '.[dev,tensorboard]'
	touch $@

# sglang and the router without their CUDA requirements, then what they need on a CPU (torch held at the local CPU
# wheel). A failed install leaves no stamp: the tier's tests then skip naming the log (fail under CI's
# LUFFY_REQUIRE_ALL_TIERS=1), and the next `make test` tries again.
$(SGLANG_STAMP): tests/sglang_cpu/requirements.txt
	@rm -rf $(SGLANG_VENV) && mkdir -p $(SGLANG_VENV)
	@echo "building $(SGLANG_VENV) (real sglang==$(SGLANG_VERSION) for the sglang test tier; log: $(SGLANG_VENV).log)"
	@( set -e; $(PYTHON) -m venv $(SGLANG_VENV); \
	  $(SGLANG_PY) -m pip install -q --upgrade pip; \
	  $(SGLANG_PY) -m pip install -q torch==$(TORCH_VERSION); \
	  $(SGLANG_PY) -m pip install -q --no-deps sglang==$(SGLANG_VERSION) sglang-router==$(SGLANG_ROUTER_VERSION); \
	  echo torch==$(TORCH_VERSION) > $(SGLANG_VENV)/constraints.txt; \
	  $(SGLANG_PY) -m pip install -q -c $(SGLANG_VENV)/constraints.txt -r tests/sglang_cpu/requirements.txt; \
	  touch $@ ) > $(SGLANG_VENV).log 2>&1 || echo "$(SGLANG_VENV) could not be built; see $(SGLANG_VENV).log"

demo: $(STAMP)
	PYTHON=$(PY) bash examples/run_tiny_cpu.sh

# Every test this machine can run. Tiers it cannot run (a local Slurm cluster: needs Slurm or root with apt-get; the
# full eval parquet) are skipped and listed with the reason at the end; LUFFY_REQUIRE_ALL_TIERS=1 makes them fail.
test: $(STAMP) $(SGLANG_STAMP)
	$(PY) -m ruff check luffy_megatron tools tests examples
	$(PY) -m pytest tests -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

# The GPU path in one command (tools/gpu_check.py): pass/fail/skip table and outputs/gpu_check/gpu_check.json. Uses
# the environment of docs/rollout.md "GPU install" (.venv when present, else $(PYTHON)); it never installs the CPU set.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) tools/gpu_check.py --out outputs/gpu_check

lint: $(STAMP)
	$(PY) -m ruff check luffy_megatron tools tests examples
	$(PY) -m ruff format --check luffy_megatron tools tests examples

clean:
	rm -rf $(VENV) $(SGLANG_VENV) $(SGLANG_VENV).log build *.egg-info
