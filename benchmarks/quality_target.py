"""Does ``kvtool encode --max-kl K`` keep its promise on prompts it has not seen? (issue 16, item 2)

For 20 prompts (Persuasion at 20 evenly spaced token offsets, ``--tokens`` each), the encoder chooses its rate on
the prompt's own last ``--probe-tokens`` tokens (what ``kvtool encode --max-kl`` runs: ``choose_rate``), writes the
``.kvz`` of the whole prompt at that rate, and the file is then judged on what the user does next: the
``--cont`` tokens that follow the prompt in the book, fed teacher-forced on the decoded cache
(``kvtool.load_cache``) and on the original cache; the measured KL per position is compared with K.

    python benchmarks/quality_target.py --max-kl 0.02 [--calibration A.kvcal.safetensors] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import kvtool
from kvtool.artifacts import read_artifact
from kvtool.codecs.kvz import CodecSettings, encode_prefix, load_cache
from kvtool.eval.harness import compare_continuations, continuation_logprobs, prefill, transform_cache
from kvtool.eval.rate_target import QualityTarget, choose_rate
from kvtool.models import tokenize
from kvtool.texts import load_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-kl", type=float, default=0.02)
    ap.add_argument("--calibration", type=Path)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--probe-tokens", type=int, default=64)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--margin", type=float, default=0.6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm = kvtool.load_model("smollm2-135m", device="cpu")
    book = tokenize(lm.tokenizer, load_text("persuasion"))
    cal = read_artifact(args.calibration) if args.calibration else None
    base = CodecSettings(mode="calibrated" if cal is not None else "adaptive")
    target = QualityTarget(max_kl=args.max_kl, probe_tokens=args.probe_tokens, margin=args.margin)
    span = book.numel() - args.tokens - args.cont - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.prompts):
            at = i * span // args.prompts
            ids, cont = book[at : at + args.tokens], book[at + args.tokens : at + args.tokens + args.cont + 1]
            t0 = time.perf_counter()
            settings, report = choose_rate(lm, ids, base, cal, target)
            path = Path(tmp) / "p.kvz"
            info = encode_prefix(lm, ids, settings, path, cal)
            encode_s = time.perf_counter() - t0
            original = prefill(lm.model, ids)
            ref = continuation_logprobs(lm.model, transform_cache(original, None), cont[:-1])
            restored, _ = load_cache(path, lm.model, cal)
            r = compare_continuations(ref, continuation_logprobs(lm.model, restored, cont[:-1]), cont[1:])
            row = {"offset": at, "bits_per_element": info["bits_per_element"], "probe_kl": report["chosen"]["kl"],
                   "file_kl": r.kl, "file_top1": r.top1, "within": r.kl <= args.max_kl,
                   "probe_s": report["probe_s"], "prefill_s": report["prefill_s"], "encode_total_s": encode_s,
                   "chosen": report["chosen"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    within = sum(r["within"] for r in rows)
    summary = {"max_kl": args.max_kl, "margin": args.margin, "calibration": str(args.calibration) if cal else None,
               "prompts": len(rows),
               "within": within, "within_frac": within / len(rows),
               "median_bits": statistics.median(r["bits_per_element"] for r in rows),
               "median_file_kl": statistics.median(r["file_kl"] for r in rows),
               "median_probe_cost_vs_prefill": statistics.median(r["probe_s"] / r["prefill_s"] for r in rows),
               "rows": rows}  # fmt: skip
    print(f"within --max-kl {args.max_kl}: {within}/{len(rows)}; median {summary['median_bits']:.2f} bits/element, "
          f"median file KL {summary['median_file_kl']:.4f}, probe cost {summary['median_probe_cost_vs_prefill']:.1f}x "
          "the probe prefix's prefill")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
