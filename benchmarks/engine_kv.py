"""Engine KV formats side by side (issue 14): FP8 per tensor / per head, NVFP4, the mixed FP8 / NVFP4 / bf16 search,
llm-compressor's default observer, and kvtool's integer methods, through the product's own calibrate and bench.

Every engine variant is an artifact of the public calibrator API (``calibrator("engine", ...)``: the same
calibration tokens, Emma + Mansfield Park, for all), written to ``--out``; then ``kvtool.eval.bench.run_bench``
(what ``kvtool bench`` runs) measures all of them on Persuasion: all-in bits, held-out ΔPPL and continuation
KL / top-1 against the untouched cache. The llm-compressor baseline is its default KV observer, ``MinMaxObserver``
(``llmcompressor/observers/min_max.py``: per-batch min / max, moving average with ``averaging_constant = 0.01``,
scale ``max(|min|, |max|) / 448``), reproduced as ``--observer minmax`` on the same sequences.

    python benchmarks/engine_kv.py --out out/engine --json benchmarks/results/engine_kv_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from kvtool.artifacts import write_artifact
from kvtool.calibrators.base import calibration_inputs, calibrator
from kvtool.eval.bench import BenchSettings, run_bench
from kvtool.models import load_model, model_record
from kvtool.texts import load_text

#: (artifact name, calibrator settings beyond kv_dtype / granularity, the fit it re-uses)
VARIANTS = [
    ("fp8-tensor-minmax-llmc", {"kv_dtype": "fp8", "observer": "minmax"}, "tensor"),
    ("fp8-tensor-amax", {"kv_dtype": "fp8", "observer": "amax"}, "tensor"),
    ("fp8-tensor-mse", {"kv_dtype": "fp8", "observer": "mse"}, "tensor"),
    ("fp8-head-minmax-llmc", {"kv_dtype": "fp8", "observer": "minmax"}, "head"),
    ("fp8-head-amax", {"kv_dtype": "fp8", "observer": "amax"}, "head"),
    ("fp8-head-mse", {"kv_dtype": "fp8", "observer": "mse"}, "head"),
    ("nvfp4-amax", {"kv_dtype": "nvfp4", "observer": "amax"}, "tensor"),
    ("nvfp4-mse", {"kv_dtype": "nvfp4", "observer": "mse"}, "tensor"),
    ("nvfp4-mse-skip2", {"kv_dtype": "nvfp4", "observer": "mse", "skip_budget": 2}, "tensor"),
    ("mixed-5.0-mse", {"kv_dtype": "mixed", "observer": "mse", "target_bits": 5.0}, "tensor"),
    ("mixed-5.0-head-mse", {"kv_dtype": "mixed", "observer": "mse", "target_bits": 5.0}, "head"),
    ("mixed-6.0-mse", {"kv_dtype": "mixed", "observer": "mse", "target_bits": 6.0}, "tensor"),
]
#: kvtool's own integer presets at equal or more all-in bits than the mixed 5.0 result
PRESETS = ["bf16", "token-k8v8", "token-k4v4", "token-k4v4-g32", "kivi-k4v4", "token-k4v4-g16"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("out/engine"))
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out Persuasion tokens for PPL")
    ap.add_argument("--offsets", default="0,40000,80000", help="continuation prefixes (token offsets)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    fits, timing, paths = {}, {}, []
    for granularity in ("tensor", "head"):
        cal = calibrator("engine", kv_dtype="fp8", granularity=granularity, num_seqs=args.num_seqs,
                         seq_len=args.seq_len)  # fmt: skip
        ids, inputs = calibration_inputs(lm, cal, "calibration")
        t0 = time.perf_counter()
        fits[granularity] = (cal, cal.fit(lm, ids, special_prefix=inputs["special_prefix"]), inputs)
        timing[granularity] = time.perf_counter() - t0
        print(f"fit ({granularity} FP8 scales): {timing[granularity]:.1f} s", file=sys.stderr)
    for name, settings, fit in VARIANTS:
        base, table, inputs = fits[fit]
        cal = dataclasses.replace(base, **settings)
        art = cal.artifacts(model_record(lm), inputs, table)[0]
        path = args.out / f"{name}.kvcal.safetensors"
        write_artifact(path, art)
        paths.append(str(path))
    settings = BenchSettings(text="evaluation", tokens=args.tokens,
                             offsets=[int(o) for o in args.offsets.split(",")])  # fmt: skip
    result = run_bench(lm, [*PRESETS, *paths], load_text("evaluation"), settings)
    result["calibration_fit_s"] = timing
    rows = result["rows"]
    print(f"{'configuration':<36} {'all-in':>7} {'ΔPPL %':>8} {'KL':>8} {'top-1':>6}")
    for r in rows:
        name = Path(r["name"]).name.removesuffix(".kvcal.safetensors")
        kl, top1 = r["kl"] or 0.0, r["top1"] or 0.0
        print(f"{name:<36} {r['all_in_bits']:7.3f} {r['delta_ppl_pct']:+8.3f} {kl:8.5f} {top1:6.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
