"""The held-out check a calibration records (``extra.validation``; ``--validate``, ``--max-ppl-delta``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kvtool.calibrators.engine_kv import EngineKVCalibration, EngineTable
from kvtool.eval.harness import perplexity
from kvtool.models import LoadedModel, special_prefix, tokenize
from kvtool.texts import load_text
from kvtool.transforms import KVTransform


def validate_transform(
    lm: LoadedModel,
    transform: KVTransform,
    text: str = "evaluation",
    tokens: int = 8192,
    window: int = 2048,
    ppl_original: float | None = None,
) -> dict[str, Any]:
    """Perplexity of held-out text with and without ``transform`` (recorded as ``extra.validation``): ``tokens``
    text tokens in windows of ``window`` tokens, each starting with the tokenizer's special prefix (its BOS, if it
    adds one), which the record names. ``ppl_original``: the untouched model's, when already measured."""
    ids = tokenize(lm.tokenizer, load_text(text))[:tokens]
    prefix = special_prefix(lm.tokenizer)
    if ppl_original is None:
        ppl_original = perplexity(lm.model, ids, window, special_prefix=prefix).ppl
    got = perplexity(lm.model, ids, window, transform, special_prefix=prefix)
    return {
        "text": text,
        "tokens": int(ids.numel()),
        "window": window,
        "special_prefix": prefix,
        "ppl_original": ppl_original,
        "ppl": got.ppl,
        "delta_ppl_pct": 100.0 * (got.ppl / ppl_original - 1.0),
    }


def fewest_skipped(
    lm: LoadedModel,
    cal: EngineKVCalibration,
    table: EngineTable,
    max_delta: float,
    tokens: int = 8192,
    log: Callable[[str], None] | None = None,
) -> tuple[EngineKVCalibration, dict[str, Any]]:
    """The engine calibration keeping the fewest layers in the model dtype (most sensitive first, the calibration's
    own order) whose held-out ΔPPL is at most ``max_delta`` %, and its validation record: a bisection over the
    number of skipped layers (ΔPPL falls as more of the most sensitive layers are skipped; the record is measured,
    not assumed). All layers skipped is the untouched cache, which always passes."""
    layers = len(table.tokens)
    seen: dict[int, dict[str, Any]] = {}
    base: float | None = None

    def check(k: int) -> bool:
        nonlocal base
        trial = dataclasses.replace(cal, skip_budget=k, target_bits=None)
        seen[k] = validate_transform(lm, trial.solve(table), tokens=tokens, ppl_original=base)
        base = seen[k]["ppl_original"]
        if log is not None:
            log(f"  {k} layer(s) in the model dtype: ΔPPL {seen[k]['delta_ppl_pct']:+.2f}%")
        return seen[k]["delta_ppl_pct"] <= max_delta

    lo, hi = 0, layers  # invariant: hi passes (all skipped), every k < lo failed
    if check(0):
        return dataclasses.replace(cal, skip_budget=0), seen[0]
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if check(mid):
            hi = mid
        else:
            lo = mid + 1
    if hi not in seen:
        check(hi)
    return dataclasses.replace(cal, skip_budget=hi, target_bits=None), seen[hi]
