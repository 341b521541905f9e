#!/usr/bin/env bash
# One device call that re-checks and re-times the GPU product path (issue 12): run it on the GPU machine from the
# repository root, with the references and wheels carried (the device tool's `carry`: .carry and .whl).
#
# Prepare here, on the CPU machine (the real SmolLM2; ~5 min for the PCA calibration on 2 cores):
#   kvtool capture smollm2-135m --tokens 256 --store-dtype float16 -o /tmp/kv.safetensors
#   kvtool calibrate smollm2-135m --method pca --num-seqs 2 -o /tmp/pca.kvcal.safetensors
#   python benchmarks/kvz_bitexact_gpu.py write --capture /tmp/kv.safetensors \
#       --calibration /tmp/pca.kvcal.safetensors --out .carry/bx && rm .carry/bx/lossless.kvz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl lmcache==0.5.0
# (keep .carry/ and .whl/ out of git: .gitignore and .git/info/exclude; together under the 64 MiB carry limit)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/kvz_bitexact_gpu.py check --dir .carry/bx 2>&1 | grep -v Warning | tee "$OUT/bitexact.log"
python3 tests/kernel_checks.py --device cuda 2>&1 | tail -1 | tee "$OUT/kernel_checks.log"
python3 benchmarks/kvz_gpu_pipeline.py --shapes llama-3.1-8b,smollm2 --tokens 2048,8192,32768 --repeats 3 \
    --lmcache --profile --json "$OUT/pipeline.json" 2>&1 | grep -v -i "warn\|LMCache INFO" | tee "$OUT/pipeline.log"
