"""The held-out check a calibration records (``extra.validation``; ``--validate``, ``--max-ppl-delta``)."""

from __future__ import annotations

from typing import Any

from kvtool.eval.harness import perplexity
from kvtool.models import LoadedModel, special_prefix, tokenize
from kvtool.texts import load_text
from kvtool.transforms import KVTransform


def validate_transform(
    lm: LoadedModel, transform: KVTransform, text: str = "evaluation", tokens: int = 8192, window: int = 2048
) -> dict[str, Any]:
    """Perplexity of held-out text with and without ``transform`` (recorded as ``extra.validation``): ``tokens``
    text tokens in windows of ``window`` tokens, each starting with the tokenizer's special prefix (its BOS, if it
    adds one), which the record names."""
    ids = tokenize(lm.tokenizer, load_text(text))[:tokens]
    prefix = special_prefix(lm.tokenizer)
    base = perplexity(lm.model, ids, window, special_prefix=prefix)
    got = perplexity(lm.model, ids, window, transform, special_prefix=prefix)
    return {
        "text": text,
        "tokens": int(ids.numel()),
        "window": window,
        "special_prefix": prefix,
        "ppl_original": base.ppl,
        "ppl": got.ppl,
        "delta_ppl_pct": 100.0 * (got.ppl / base.ppl - 1.0),
    }
