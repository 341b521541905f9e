"""Plug a :class:`~kvtool.transforms.KVTransform` into every attention layer through transformers' public
``AttentionInterface`` (no patching of modeling code).

Inside :func:`transformed_attention`, the model's attention implementation (``sdpa``, ``flash_attention_2``, ...)
is swapped for a registered wrapper ``kvtool-<impl>`` that transforms the keys and values each layer hands to
attention, then calls the original implementation. This is the KVQuant evaluation protocol: attention reads the
transformed K/V everywhere, prefill included. It is meant for fresh forward passes from position 0 without a
cache (the perplexity harness); the positions of the keys are then those of the queries, whose RoPE is observed
by :class:`~kvtool.capture.RopeRecorder`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from kvtool.capture import RopeRecorder
from kvtool.transforms import KVTransform

#: Called once per attention layer per forward: ``(layer_idx, key, value, cos, sin) -> (key, value)``.
#: ``key`` is post-RoPE, ``(batch, kv_heads, seq, head_dim)``; ``cos``/``sin`` ``(batch, seq, head_dim)``.
KVHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

_ACTIVE: ContextVar[tuple[KVHook, RopeRecorder] | None] = ContextVar("kvtool_active_kv_hook", default=None)


def _wrapper_for(base_name: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"kvtool-{base_name}"
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name
    base_fn = ALL_ATTENTION_FUNCTIONS[base_name]

    def kvtool_attention(
        module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
    ) -> Any:
        active = _ACTIVE.get()
        if active is not None:
            hook, rec = active
            if id(module) not in rec.by_module:
                raise RuntimeError(f"no RoPE was observed for attention layer {module.layer_idx}")
            cos, sin = rec.by_module[id(module)]
            if cos.shape[-2] != key.shape[-2]:
                raise RuntimeError(
                    "kvtool's attention hooks need fresh forward passes without a cache "
                    f"({key.shape[-2]} keys for {cos.shape[-2]} positions)"
                )
            key, value = hook(module.layer_idx, key, value, cos, sin)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, kvtool_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


@contextmanager
def intercepted_attention(model: Any, hook: KVHook) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` passes its K/V through ``hook`` before attending.

    For fresh forward passes from position 0 without a cache (keys then sit at the positions of the queries).
    Blocks cannot be nested.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _ACTIVE.get() is not None:
        raise RuntimeError("kvtool attention hooks cannot be nested; compose the transforms instead")
    base = model.config._attn_implementation
    if base not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise RuntimeError(
            f"attention implementation '{base}' cannot be wrapped; load the model with attn_implementation='sdpa'"
        )
    model.set_attn_implementation(_wrapper_for(base))
    token = None
    try:
        with RopeRecorder(model) as rec:
            token = _ACTIVE.set((hook, rec))
            yield
    finally:
        if token is not None:
            _ACTIVE.reset(token)
        model.set_attn_implementation(base)


@contextmanager
def transformed_attention(model: Any, transform: KVTransform | None) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` reads K/V transformed by ``transform``.

    ``None`` or an identity transform leaves the model untouched (so its perplexity is exactly the model's own).
    """
    if transform is None or transform.is_identity:
        yield
        return
    with intercepted_attention(model, transform.apply_layer):
        yield
