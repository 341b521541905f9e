"""What each calibrator costs at scale (issue 14, item 6): wall time, peak GPU memory and peak host RSS of
``calibrator(...).fit`` + ``.artifacts`` (what ``kvtool calibrate`` runs) on a Llama-3.1-8B-shaped model with
random bf16 weights built in code, 8 calibration sequences of 2,048 tokens (Persuasion's words hashed into the
vocabulary: real text statistics without a tokenizer for a random model).

Each method runs in its own process, so peaks are its own (``torch.cuda.max_memory_allocated``, the process's
``ru_maxrss``); the model build is timed apart from the fit. Targets: <= 10 GPU-minutes and <= 40 GB of GPU
memory per method.

    python benchmarks/calibrate_cost.py --json out.json                  # every method, one process each
    python benchmarks/calibrate_cost.py --method pca --one               # one method, this process
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

METHODS = {
    "search": {"target_bits": 3.25},
    "nuq": {"bits": [2, 3, 4]},
    "pca": {"target_bits": 2.0},
    "engine-fp8": {"kv_dtype": "fp8", "granularity": "head", "observer": "mse"},
    "engine-mixed": {"kv_dtype": "mixed", "target_bits": 5.0, "observer": "mse"},
}


def run_one(method: str, shape: str, num_seqs: int, seq_len: int, device: str = "cuda") -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from kvz_gpu_pipeline import BenchLM, build_model, text_ids

    from kvtool.calibrators.base import calibrator
    from kvtool.models import model_record

    gpu = device == "cuda"
    t0 = time.perf_counter()
    lm = BenchLM(build_model(shape, device, torch.bfloat16 if gpu else torch.float32))
    build_s = time.perf_counter() - t0
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if gpu else 0
    name = "engine" if method.startswith("engine") else method
    cal = calibrator(name, num_seqs=num_seqs, seq_len=seq_len, **METHODS[method])
    ids = text_ids(num_seqs * seq_len * 4, lm.arch.vocab_size)
    t0 = time.perf_counter()
    table = cal.fit(lm, ids, special_prefix=[])
    arts = cal.artifacts(model_record(lm), {"text": "persuasion (hashed words)"}, table)
    if gpu:
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    bits = {k: round(a.extra["bits"]["all_in"], 4) for k, a in arts.items()}
    return {
        "method": method, "shape": shape, "num_seqs": num_seqs, "seq_len": seq_len, "passes": cal.passes,
        "build_s": round(build_s, 2), "fit_s": round(fit_s, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if gpu else None,
        "model_gpu_gb": round(base_mem / 1e9, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "all_in_bits": bits, "device": torch.cuda.get_device_name() if gpu else "cpu",
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default=",".join(METHODS))
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run at small shapes")
    ap.add_argument("--one", action="store_true", help="run the one --method in this process, print its JSON line")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.method, args.shape, args.num_seqs, args.seq_len, args.device)), flush=True)
        return 0
    rows = []
    for method in args.method.split(","):
        cmd = [sys.executable, __file__, "--one", "--method", method, "--shape", args.shape,
               "--num-seqs", str(args.num_seqs), "--seq-len", str(args.seq_len), "--device", args.device]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
        row = json.loads(line) if line.startswith("{") else {
            "method": method, "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
