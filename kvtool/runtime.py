"""A transformers ``Cache`` that stores K/V the way a calibration artifact prescribes, for ``model.generate``.

Each layer commits tokens to its transformed store in blocks, KIVI-style (arXiv:2402.02750): the first
``sink_tokens`` positions are kept in fp16; after them, tokens wait in an fp16 tail until a full block of the
layer's quantizers (the group size of a per-channel quantizer, one token otherwise) is older than the
``recent_tokens`` window, then the block is transformed (keys before RoPE when the artifact says so) and kept.
Attention always reads the committed (transformed) tokens followed by the fp16 tail. The values are simulated
(quantize then dequantize, as KVTuner's and KVQuant's evaluation caches do), so memory is not reduced; the codec
(``.kvz``) is where bytes shrink.

RoPE of the new tokens is observed with :class:`~kvtool.capture.RopeRecorder` hooks on the model, installed when
the cache is created and removed by :meth:`TransformedCache.close` (or at the end of a ``with`` block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvtool.arch import SLIDING, apply_rope, arch_info, invert_rope
from kvtool.calibration import load_calibration
from kvtool.capture import RopeRecorder
from kvtool.errors import ArtifactError
from kvtool.models import LoadedModel
from kvtool.quantizers import NonUniformQuantizer, UniformQuantizer
from kvtool.quantizers.nonuniform import OUTLIER_BLOCK
from kvtool.transforms import KVTransform, TensorTransform


def _block(t: TensorTransform | None, head_dim: int) -> int:
    """Tokens a layer commits at once: a per-channel quantizer's group, a non-uniform quantizer's outlier block."""
    if isinstance(t, UniformQuantizer) and t.axis == "channel":
        return t.group_size or 32
    if isinstance(t, NonUniformQuantizer) and t.axis == "channel" and t.outlier_frac:
        return OUTLIER_BLOCK
    return 1


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


class _Transformed:
    """The commit logic shared by full and sliding layers (mixed into transformers' layer classes)."""

    def _setup(self, layer_idx: int, transform: KVTransform, rec: RopeRecorder) -> None:
        self.layer_idx, self.kvt, self.rec = layer_idx, transform, rec
        self.kt, self.vt = transform.keys[layer_idx], transform.values[layer_idx]
        self.block = 1
        self.seen = 0  # tokens received so far (their positions are 0..seen-1)
        self.committed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tail: list[torch.Tensor] | None = None  # [keys_post, values, cos, sin]

    def _commit(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first: int) -> None:
        if self.kt is not None:
            if self.kvt.keys_pre_rope:
                k = apply_rope(self.kt.apply(invert_rope(k, cos, sin)), cos, sin)
            else:
                k = self.kt.apply(k)
        if self.vt is not None:
            v = self.vt.apply(v)
        if first < self.kvt.sink_tokens:  # sinks are never quantized
            k, v = _fp16(k), _fp16(v)
        self.committed = (k, v) if self.committed is None else (
            torch.cat([self.committed[0], k], dim=-2), torch.cat([self.committed[1], v], dim=-2)
        )  # fmt: skip

    def _transformed_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = key_states.shape[-2]
        if self.kvt.keys_pre_rope and self.kt is not None:
            cos, sin = self.rec.cos_sin(self.layer_idx)
            cos, sin = cos[..., -n:, :], sin[..., -n:, :]
        else:  # rotation unused: placeholders keep the tail aligned
            cos = sin = key_states.new_zeros(key_states.shape[0], n, key_states.shape[-1])
        new = [key_states, value_states, cos, sin]
        self.tail = (
            new if self.tail is None else [torch.cat([a, b], dim=-2) for a, b in zip(self.tail, new, strict=True)]
        )
        start = self.seen - self.tail[0].shape[-2] + n  # position of the tail's first token
        self.seen += n
        # Sinks: positions below sink_tokens are committed at once, unquantized.
        sinks = max(0, min(self.kvt.sink_tokens - start, self.tail[0].shape[-2]))
        if sinks:
            self._commit(*[t[..., :sinks, :] for t in self.tail], first=start)
            self.tail = [t[..., sinks:, :] for t in self.tail]
            start += sinks
        ready = (self.tail[0].shape[-2] - self.kvt.recent_tokens) // self.block * self.block
        if ready > 0:
            self._commit(*[t[..., :ready, :] for t in self.tail], first=start)
            self.tail = [t[..., ready:, :] for t in self.tail]
        tail_k, tail_v = _fp16(self.tail[0]), _fp16(self.tail[1])
        if self.committed is None:
            return tail_k, tail_v
        return torch.cat([self.committed[0], tail_k], dim=-2), torch.cat([self.committed[1], tail_v], dim=-2)


class TransformedLayer(_Transformed, DynamicLayer):
    """A full-attention layer whose cache holds transformed K/V (see module docstring)."""

    is_croppable = False

    def __init__(self, layer_idx: int, transform: KVTransform, rec: RopeRecorder, head_dim: int):
        DynamicLayer.__init__(self)
        self._setup(layer_idx, transform, rec)
        self.block = max(_block(self.kt, head_dim), _block(self.vt, head_dim))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._transformed_update(key_states, value_states)
        return self.keys, self.values


class TransformedSlidingLayer(_Transformed, DynamicSlidingWindowLayer):
    """A sliding-window layer: same commit logic, and only the last ``sliding_window - 1`` tokens stay."""

    is_croppable = False

    def __init__(self, layer_idx: int, transform: KVTransform, rec: RopeRecorder, head_dim: int, window: int):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=window)
        self._setup(layer_idx, transform, rec)
        self.block = max(_block(self.kt, head_dim), _block(self.vt, head_dim))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_k, full_v = self._transformed_update(key_states, value_states)
        keep = self.sliding_window - 1
        self.keys, self.values = full_k[..., -keep:, :], full_v[..., -keep:, :]
        if self.committed is not None:  # older committed tokens can never be attended again
            tail = self.tail[0].shape[-2]
            self.committed = tuple(c[..., -max(keep - tail, 0) :, :] if keep > tail else c[..., :0, :]
                                   for c in self.committed)  # fmt: skip
        return full_k, full_v


class TransformedCache(Cache):
    """A ``Cache`` of :class:`TransformedLayer` / :class:`TransformedSlidingLayer`, one per model layer."""

    def __init__(self, model: Any, transform: KVTransform):
        arch = arch_info(model.config)
        if len(transform.keys) != arch.num_layers:
            raise ArtifactError(f"the transform has {len(transform.keys)} layers, the model {arch.num_layers}")
        self.recorder = RopeRecorder(model).__enter__()
        layers: list[Any] = []
        for i in range(arch.num_layers):
            if arch.layer_types[i] == SLIDING and arch.sliding_window:
                layers.append(TransformedSlidingLayer(i, transform, self.recorder, arch.head_dim, arch.sliding_window))
            else:
                layers.append(TransformedLayer(i, transform, self.recorder, arch.head_dim))
        super().__init__(layers=layers)

    def close(self) -> None:
        """Remove the RoPE hooks from the model."""
        self.recorder.__exit__(None, None, None)

    def __enter__(self) -> TransformedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_quantized_cache(artifact: str | Path, model: Any) -> TransformedCache:
    """A cache applying a calibration artifact's per-layer quantization, for ``model.generate(past_key_values=...)``.

    ``model`` is a transformers model or a :class:`~kvtool.models.LoadedModel`; with the latter, an artifact made
    for another model is refused (exit 3). Close the cache (or use it in a ``with`` block) to remove its hooks.
    """
    fingerprint = model.fingerprint if isinstance(model, LoadedModel) else None
    hf_model = model.model if isinstance(model, LoadedModel) else model
    _, transform = load_calibration(artifact, model=fingerprint)
    return TransformedCache(hf_model, transform)
