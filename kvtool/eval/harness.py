"""Quality harness: perplexity with a KV transform in every layer, and continuation quality of a prefix cache.

(a) :func:`perplexity`: non-overlapping windows of ``window`` tokens, each a fresh forward pass from position 0;
    every attention layer reads the transformed K/V, prefill included (KVQuant's protocol, arXiv:2401.18079).
    A window of ``w`` tokens scores ``w - 1`` predictions.
(b) :func:`continuation_quality`: the cache of a prefix of P tokens is transformed (or decoded from a ``.kvz``
    file: the bench codec rows); the next C tokens are fed teacher-forced on top of it and their predictions are
    compared with those made from the untouched cache: perplexity of the C targets, mean KL(p_original ||
    p_transformed) in nats per position, and top-1 agreement. All C scored predictions depend on the cache.

Both take the text as one stream of text tokens (``tokenize(..., prompt=False)``) and the tokenizer's
``special_prefix`` (:func:`kvtool.models.special_prefix`, e.g. ``[bos_token_id]``; empty for tokenizers that add
none): every perplexity window and every cached prefix starts with it, as evaluation harnesses (lm-eval) and
serving engines feed a model; continuations never get it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvtool.attention import transformed_attention
from kvtool.capture import prefill_with_rope
from kvtool.errors import InputError, KvtoolError
from kvtool.models import cache_kwargs, with_prefix
from kvtool.transforms import KVTransform


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    num_predictions: int
    num_windows: int


@torch.no_grad()
def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    window: int = 2048,
    transform: KVTransform | None = None,
    progress: Callable[[int], None] | None = None,
    special_prefix: Sequence[int] = (),
) -> PerplexityResult:
    """Perplexity of ``input_ids`` (text tokens, shape ``(n,)``) over non-overlapping windows, K/V transformed by
    ``transform``.

    Each window is ``special_prefix`` followed by the next ``window - len(special_prefix)`` text tokens, so it is
    ``window`` tokens long whatever the prefix; with a BOS prefix every text token is predicted. A trailing partial
    window shorter than 2 tokens is dropped. Sink and recent-window settings apply to each window as a whole (the
    last ``recent_tokens`` of the window stay fp16 for every query), which is the cache a decoder holds after the
    window, the state :meth:`KVTransform.bits` counts. ``progress`` is called with the number of text tokens done
    after each window.
    """
    step = window - len(special_prefix)
    if window < 2 or step < 1:
        raise ValueError(f"window must be >= 2 and longer than the special prefix {list(special_prefix)}")
    device = next(model.parameters()).device
    nll, count, windows = 0.0, 0, 0
    with transformed_attention(model, transform):
        for start in range(0, input_ids.numel(), step):
            text = input_ids[start : start + step]
            chunk = with_prefix(special_prefix, text)
            if chunk.numel() < 2:
                break
            ids = chunk[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
            windows += 1
            if progress:
                progress(text.numel())
    if count == 0:
        raise InputError("the text is too short for a perplexity measurement (needs at least 2 tokens)")
    return PerplexityResult(math.exp(nll / count), nll, count, windows)


@dataclass
class PrefixCache:
    """A prefix's cache with the RoPE of each of its layers: ``positions``, ``cos``, ``sin`` per layer."""

    cache: Any
    rope: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    prefix_len: int
    ids: torch.Tensor | None = None


@torch.no_grad()
def prefill(model: Any, prefix_ids: torch.Tensor) -> PrefixCache:
    """Run the prefix (shape ``(P,)``) from position 0 and keep its cache and per-layer RoPE."""
    cache, rope = prefill_with_rope(model, prefix_ids[None])
    return PrefixCache(cache, rope, prefix_ids.numel(), prefix_ids)


def transform_cache(prefix: PrefixCache, transform: Any) -> Any:
    """A copy of the prefix cache with every layer's K/V replaced by its transformed version. ``transform`` is a
    :class:`KVTransform`, ``None``, or a codec with ``code_cache(cache, ids)`` (the cache round-trips a real
    encoding)."""
    cache = copy.deepcopy(prefix.cache)
    if hasattr(transform, "code_cache"):
        return transform.code_cache(cache, prefix.ids)
    if transform is None or transform.is_identity:
        return cache
    for i, layer in enumerate(cache.layers):
        positions, cos, sin = prefix.rope[i]
        layer.keys, layer.values = transform.apply_layer(
            i, layer.keys, layer.values, cos, sin, first_position=int(positions[0]) if positions.numel() else 0
        )
    return cache


@dataclass(frozen=True)
class ContinuationResult:
    ppl: float
    kl: float  #: mean KL(p_original || p_candidate), nats per position
    top1: float  #: fraction of positions where both caches give the same argmax
    num_predictions: int
    error: str | None = None  #: why this row could not be measured (the others still are)


@torch.no_grad()
def continuation_logprobs(model: Any, cache: Any, cont_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``(C, vocab)`` (float32) of the next token after each of ``cont_ids`` fed on ``cache``."""
    ids = cont_ids[None].to(next(model.parameters()).device)
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[0].float()
    return F.log_softmax(logits, dim=-1)


def compare_continuations(ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> ContinuationResult:
    """Metrics of candidate log-probs ``logp`` against the reference ``ref_logp`` (both ``(C, vocab)``)."""
    targets = targets.to(logp.device)
    nll = F.nll_loss(logp, targets, reduction="mean").item()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0).mean().item()
    top1 = (ref_logp.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return ContinuationResult(math.exp(nll), kl, top1, targets.numel())


def continuation_quality(
    model: Any,
    token_ids: torch.Tensor,
    transforms: Sequence[KVTransform | None],
    prefix_len: int = 2048,
    cont_len: int = 256,
    offsets: Sequence[int] = (0,),
    special_prefix: Sequence[int] = (),
) -> list[ContinuationResult]:
    """Continuation metrics of each transform, averaged over prefixes starting at ``offsets``.

    ``token_ids`` are text tokens. For an offset ``o``, the cache holds ``special_prefix`` then text tokens
    ``[o, o+T)``, ``T = P - len(special_prefix)``, at positions ``0..P-1`` (a prompt of P tokens as an engine
    tokenizes it); tokens ``[o+T, o+T+C)`` are fed teacher-forced (no BOS: they continue the prefix) and predict
    ``[o+T+1, o+T+C+1)``. PPL is taken over all scored tokens; KL and top-1 are means over positions.
    """
    text_len = prefix_len - len(special_prefix)
    if text_len < 1:
        raise InputError(f"a prefix of {prefix_len} tokens leaves no room for text after {list(special_prefix)}")
    need = max(offsets) + text_len + cont_len + 1
    if token_ids.numel() < need:
        raise InputError(f"the text has {token_ids.numel()} tokens; continuation at these offsets needs {need}")
    sums = [[0.0, 0.0, 0.0, 0] for _ in transforms]
    errors: list[str | None] = [None] * len(transforms)
    for o in offsets:
        prefix = prefill(model, with_prefix(special_prefix, token_ids[o : o + text_len]))
        cont = token_ids[o + text_len : o + text_len + cont_len]
        targets = token_ids[o + text_len + 1 : o + text_len + cont_len + 1]
        ref = continuation_logprobs(model, transform_cache(prefix, None), cont)
        for j, t in enumerate(transforms):
            if errors[j] is not None:
                continue
            try:
                logp = continuation_logprobs(model, transform_cache(prefix, t), cont)
            except (KvtoolError, RuntimeError, ValueError) as e:  # one failing codec must not cost the others
                errors[j] = f"{type(e).__name__}: {' '.join(str(e).split())}"
                continue
            r = compare_continuations(ref, logp, targets)
            s = sums[j]
            s[0] += math.log(r.ppl) * r.num_predictions
            s[1] += r.kl * r.num_predictions
            s[2] += r.top1 * r.num_predictions
            s[3] += r.num_predictions
    nan = float("nan")
    return [
        ContinuationResult(math.exp(a / n), b / n, c / n, n) if e is None else ContinuationResult(nan, nan, nan, 0, e)
        for (a, b, c, n), e in zip(sums, errors, strict=True)
    ]
