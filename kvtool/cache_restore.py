"""Rebuild a transformers cache from per-layer K/V tensors, with the library's own sliding-window semantics.

The one place kvtool turns decoded (or otherwise reproduced) key/value tensors back into a cache that
``model.generate`` continues from: ``kvtool.load_cache``, ``kvtool decode --generate`` and every bench codec row go
through :func:`restore_cache`.

Why not just ``cache.update(k, v, i)`` per layer: transformers' sliding-window layers
(``DynamicSlidingWindowLayer``) keep only the last ``sliding_window - 1`` tokens but count every token they were
ever given (``get_seq_length()``), and that count drives the positions of the next tokens and the offset of the
sliding attention mask. A layer restored from its ``window - 1`` stored tokens would believe the context is
``window - 1`` tokens long, so a continuation after a prefix longer than the window would run at the wrong
positions with the wrong mask. :func:`restore_cache` therefore tells each such layer how many tokens the context
really holds, and then checks, through the cache's public methods, that every layer reports the context length
and keeps exactly the tokens it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def restore_cache(
    model: Any,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    context_len: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A ``DynamicCache`` holding ``layers`` as the cache after a prefill of ``context_len`` tokens.

    Parameters
    ----------
    model
        The transformers model the cache is for (its config decides which layers slide).
    layers
        Per layer ``(keys, values)``, each ``(batch, num_kv_heads, n_i, head_dim)``, post-RoPE keys, in position
        order; ``n_i`` is ``context_len`` for full-attention layers and ``min(context_len, window - 1)`` for
        sliding-window layers (the last tokens of the context).
    context_len
        Tokens of the prefix the cache stands for.
    device, dtype
        Where and in which dtype the cache lives (default: the model's).

    Raises
    ------
    RuntimeError
        The cache does not hold what a prefill would have left (a transformers version whose cache layers keep
        another number of tokens): restoring it would silently give wrong continuations.
    """
    from transformers import DynamicCache

    param = next(model.parameters())
    device = param.device if device is None else device
    dtype = param.dtype if dtype is None else dtype
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        k, v = k.to(device, dtype), v.to(device, dtype)
        layer = cache.layers[i] if i < len(cache.layers) else None
        fresh = not getattr(layer, "is_initialized", True) and hasattr(layer, "lazy_initialization")
        if type(layer) is DynamicLayer and fresh and k.is_contiguous() and v.is_contiguous():
            # A full-attention layer holds exactly what it is given: take the tensors as they are (``update``
            # would concatenate them onto an empty tensor, a copy of the whole cache); checked below like the rest.
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            cache.update(k, v, i)
        layer = cache.layers[i]
        held = k.shape[-2]
        if getattr(layer, "is_sliding", False) and held < context_len:
            # The layer saw `held` tokens; a prefill would have shown it all `context_len` of them.
            layer.cumulative_length = context_len
        if layer.get_seq_length() != context_len or layer.keys.shape[-2] != held:
            raise RuntimeError(
                f"layer {i}: the restored cache reports {layer.get_seq_length()} tokens and keeps "
                f"{layer.keys.shape[-2]}, expected {context_len} and {held} (unsupported transformers cache layer "
                f"{type(layer).__name__})"
            )
    return cache
