"""Quality-targeted encoding (``kvtool encode --max-kl K / --max-ppl-delta P``): the cheapest codec rate whose
measured quality on a probe of the prompt itself meets the target.

The encoder has the model and the prompt, so it can measure what a rate costs on *this* prompt instead of trusting
a calibration-set average: the prompt's last ``probe_tokens`` tokens are held out, the rest is prefilled once, and
for a candidate rate that prefix cache goes through a real ``.kvz`` (encode, decode) and the held-out tokens are
fed on it, teacher-forced, beside the original cache; KL(original ‖ decoded) per position and the perplexity of
the held-out tokens are the measurement. Candidates are ordered by rate (calibrated: the artifact's codec levels;
adaptive: steps from coarse to fine); quality is taken as monotone in rate, so the cheapest passing candidate is
found by bisection (``⌈log2 n⌉ + 1`` probes at most, each one prefix encode + decode and one ``probe_tokens``
forward): the probe's cost is bounded and reported.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvtool.artifacts import Artifact
from kvtool.codecs.coding import make_coder
from kvtool.codecs.ecsq import codec_levels
from kvtool.codecs.kvz import CodecSettings
from kvtool.errors import QualityGateError, UsageError
from kvtool.eval.codec_rows import CodecRow
from kvtool.eval.harness import compare_continuations, continuation_logprobs, prefill, transform_cache

#: adaptive steps (standard deviations per channel) tried, coarsest (cheapest) first
ADAPTIVE_QUALITIES = (3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.125, 0.09)
MIN_PREFIX = 16  #: tokens the probe must leave to the prefix


@dataclass(frozen=True)
class QualityTarget:
    """``max_kl``: mean KL per probe position (nats); ``max_ppl_delta``: probe perplexity increase in percent;
    ``probe_tokens``: how many of the prompt's last tokens are held out to measure them; ``margin``: the probe must
    meet the targets times this factor, because the text that will follow the prompt is not the probe (on 20
    Persuasion prompts the written file's KL on the next 64 tokens was up to 1.8× its probe's; margin 1.0 kept 18
    of 20 within K: ``benchmarks/quality_target.py``, docs/benchmarks.md "Issue 16")."""

    max_kl: float | None = None
    max_ppl_delta: float | None = None
    probe_tokens: int = 64
    margin: float = 0.6

    def __post_init__(self) -> None:
        if self.max_kl is None and self.max_ppl_delta is None:
            raise UsageError("a quality target needs --max-kl or --max-ppl-delta")
        for name, value in (("--max-kl", self.max_kl), ("--max-ppl-delta", self.max_ppl_delta)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0 (got {value})")
        if not 2 <= self.probe_tokens <= 4096:
            raise UsageError(f"--probe-tokens must be in 2..4096 (got {self.probe_tokens})")
        if not 0 < self.margin <= 1:
            raise UsageError(f"--probe-margin must be in (0, 1] (got {self.margin})")

    def met(self, kl: float, ppl_delta: float) -> bool:
        """Whether a probe's KL and perplexity increase meet the targets times :attr:`margin`."""
        return (self.max_kl is None or kl <= self.max_kl * self.margin) and (
            self.max_ppl_delta is None or ppl_delta <= self.max_ppl_delta * self.margin)  # fmt: skip


def candidates(base: CodecSettings, calibration: Artifact | None) -> list[CodecSettings]:
    """The rates to choose from, cheapest first."""
    if base.mode == "calibrated":
        make_coder(base, calibration, None)  # the artifact's own refusal when it has no codec levels (exit 3)
        levels = codec_levels(calibration.tensors)  # type: ignore[union-attr]
        order = sorted(range(len(levels)), key=lambda i: levels[i].expected_bits)
        return [dataclasses.replace(base, level=i) for i in order]
    if base.mode == "adaptive":
        return [dataclasses.replace(base, quality=q) for q in ADAPTIVE_QUALITIES]
    raise UsageError("--max-kl and --max-ppl-delta choose a lossy rate: not with --lossless")


def choose_rate(lm: Any, ids: torch.Tensor, base: CodecSettings, calibration: Artifact | None,
                target: QualityTarget) -> tuple[CodecSettings, dict[str, Any]]:  # fmt: skip
    """The cheapest of :func:`candidates` whose probe meets ``target``, and the report of what was measured
    (``QualityGateError``, exit 4, when even the richest does not)."""
    tokens = int(ids.numel())
    probe = min(target.probe_tokens, tokens - MIN_PREFIX)
    if probe < 2:
        raise UsageError(f"a {tokens}-token prompt is too short to probe (needs >= {MIN_PREFIX + 2} tokens)")
    prefix_ids, cont, targets = ids[: tokens - probe], ids[tokens - probe : -1], ids[tokens - probe + 1 :]
    t0 = time.perf_counter()
    prefix = prefill(lm.model, prefix_ids)
    prefill_s = time.perf_counter() - t0
    ref = continuation_logprobs(lm.model, transform_cache(prefix, None), cont)
    ref_ppl = compare_continuations(ref, ref, targets).ppl
    rates = candidates(base, calibration)
    tried: dict[int, dict[str, Any]] = {}

    def measure(i: int) -> dict[str, Any]:
        if i not in tried:
            row = CodecRow(f"candidate {i}", lm, rates[i], calibration=calibration)
            r = compare_continuations(ref, continuation_logprobs(lm.model, transform_cache(prefix, row), cont),
                                      targets)  # fmt: skip
            delta = 100.0 * (r.ppl / ref_ppl - 1.0)
            tried[i] = {"level" if base.mode == "calibrated" else "quality":
                        rates[i].level if base.mode == "calibrated" else rates[i].quality,
                        "bits_per_element": row.bits_per_element, "kl": r.kl, "ppl_delta_pct": delta,
                        "top1": r.top1, "meets": target.met(r.kl, delta)}  # fmt: skip
        return tried[i]

    t0 = time.perf_counter()
    lo, hi = 0, len(rates) - 1
    if not measure(hi)["meets"]:
        best = tried[hi]
        raise QualityGateError(f"no rate meets the target on the prompt's last {probe} tokens: the richest "
                               f"({best['bits_per_element']:.2f} bits/element) measured KL {best['kl']:.4g}, "
                               f"ΔPPL {best['ppl_delta_pct']:+.2f} %")  # fmt: skip
    while lo < hi:  # invariant: rates[hi] meets the target
        mid = (lo + hi) // 2
        if measure(mid)["meets"]:
            hi = mid
        else:
            lo = mid + 1
    probe_s = time.perf_counter() - t0
    report = {"max_kl": target.max_kl, "max_ppl_delta_pct": target.max_ppl_delta, "probe_tokens": probe,
              "margin": target.margin,
              "chosen": tried[hi], "tried": [tried[i] for i in sorted(tried)], "probe_s": probe_s,
              "prefill_s": prefill_s, "probe_cost_vs_prefill": probe_s / max(prefill_s, 1e-9)}  # fmt: skip
    return rates[hi], report
