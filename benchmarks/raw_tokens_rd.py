"""Are fp16 positions (sinks, a recent window: the crude form of anchor tokens) worth their bits in a calibrated
``.kvz``? Continuation quality of calibrated levels with more raw positions, beside the next level (issue 16).

SmolLM2-135M on the CPU, Persuasion, 3 prefixes of 2,048 tokens (offsets 0, 40,000, 80,000), 256 continuation
tokens each, as ``kvtool bench`` measures its codec rows (real ``.kvz`` files, all-in bits).

    python benchmarks/raw_tokens_rd.py smollm2-135m.pca.kvcal.safetensors
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calibration")
    args = ap.parse_args()
    import kvtool
    from kvtool.artifacts import read_artifact
    from kvtool.codecs.kvz import CodecSettings
    from kvtool.eval.codec_rows import CodecRow
    from kvtool.eval.harness import continuation_quality
    from kvtool.models import special_prefix, tokenize
    from kvtool.texts import load_text

    torch.set_num_threads(2)
    lm = kvtool.load_model("smollm2-135m", device="cpu")
    cal = read_artifact(args.calibration)
    ids = tokenize(lm.tokenizer, load_text("persuasion"))
    grid = [(1, 1, 0), (1, 4, 0), (1, 1, 64), (1, 4, 64), (2, 1, 0), (2, 4, 0), (2, 4, 64)]  # level, sinks, recent
    rows = [CodecRow(f"L{level} sinks {s} recent {r}", lm,
                     CodecSettings(mode="calibrated", level=level, sink_tokens=s, recent_tokens=r), calibration=cal)
            for level, s, r in grid]  # fmt: skip
    res = continuation_quality(lm.model, ids, [None, *rows], 2048, 256, [0, 40000, 80000], special_prefix(lm.tokenizer))
    base = res[0].ppl
    print("| codec | all-in bits | cont. ΔPPL % | KL | top-1 |\n|---|---|---|---|---|")
    for row, r in zip(rows, res[1:], strict=True):
        delta = 100 * (r.ppl / base - 1)
        print(f"| {row.name} | {row.bits_per_element:.3f} | {delta:+.2f} | {r.kl:.4f} | {r.top1:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
