"""KV capture: run a prefill and return, per layer, pre-RoPE keys, cached (post-RoPE) keys and values.

The cache is read through transformers' public ``DynamicCache.layers[i].keys / .values``. Pre-RoPE keys are
recovered by rotating the cached keys back with the very ``(cos, sin)`` each layer used, observed with forward
pre-hooks (:class:`RopeRecorder`); so models that normalise keys before RoPE (Gemma3's ``k_norm``) give the normed
key, and per-layer-type RoPE (Gemma3's local/global theta) is handled without naming any module.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kvtool.arch import invert_rope
from kvtool.models import output_cache


class RopeRecorder:
    """Records the ``(cos, sin)`` pair every attention layer receives during a forward pass.

    Attention modules are recognised generically: they carry an integer ``layer_idx`` and are called with a
    ``position_embeddings`` keyword (transformers' convention for RoPE models).
    """

    def __init__(self, model: Any):
        self.model = model
        self.by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.by_module: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            self.by_layer[module.layer_idx] = pe
            self.by_module[id(module)] = pe

    def __enter__(self) -> RopeRecorder:
        for module in self.model.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def cos_sin(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(cos, sin)`` of ``layer_idx``, each of shape ``(batch, seq, head_dim)``."""
        if layer_idx not in self.by_layer:
            raise RuntimeError(
                f"layer {layer_idx} received no position_embeddings: this model does not use RoPE the way "
                "transformers' decoder models do, so pre-RoPE keys are not available"
            )
        return self.by_layer[layer_idx]


@dataclass
class LayerKV:
    """One layer's captured cache.

    Attributes
    ----------
    keys_pre_rope : torch.Tensor
        ``(batch, num_kv_heads, n, head_dim)``: keys before RoPE (after any key norm).
    keys : torch.Tensor
        ``(batch, num_kv_heads, n, head_dim)``: keys as cached (post-RoPE).
    values : torch.Tensor
        ``(batch, num_kv_heads, n, head_dim)``.
    positions : torch.Tensor
        ``(n,)`` int64 positions of the cached tokens (sliding layers keep only the most recent ones).
    cos, sin : torch.Tensor
        ``(batch, n, head_dim)``: the rotation applied to these keys.
    """

    keys_pre_rope: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class KVCapture:
    """Per-layer :class:`LayerKV` of one prefill, plus the cache object itself (for continuing generation)."""

    layers: list[LayerKV]
    cache: Any
    input_ids: torch.Tensor


def layer_rope(rec: RopeRecorder, layer_idx: int, n_cached: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, cos, sin)`` of the ``n_cached`` most recent positions of a layer in the recorded forward."""
    cos, sin = rec.cos_sin(layer_idx)
    total = cos.shape[-2]
    positions = torch.arange(total - n_cached, total, device=cos.device)
    return positions, cos[..., total - n_cached :, :], sin[..., total - n_cached :, :]


@torch.no_grad()
def prefill_with_rope(
    model: Any, ids: torch.Tensor
) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Prefill ``ids`` (shape ``(batch, seq)``) from position 0; return the cache and, per layer, the
    ``(positions, cos, sin)`` of its cached tokens."""
    ids = ids.to(next(model.parameters()).device)
    with RopeRecorder(model) as rec:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    return cache, [layer_rope(rec, i, layer.keys.shape[-2]) for i, layer in enumerate(cache.layers)]


@torch.no_grad()
def capture_kv(model: Any, input_ids: torch.Tensor) -> KVCapture:
    """Prefill ``input_ids`` (shape ``(seq,)`` or ``(batch, seq)``) from position 0 and capture the cache.

    Returns a :class:`KVCapture` whose layer ``i`` holds pre-RoPE keys, cached keys and values of shape
    ``(batch, num_kv_heads, n_i, head_dim)`` where ``n_i`` is ``seq`` for full-attention layers and at most
    ``sliding_window - 1`` for sliding-window layers.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    cache, rope = prefill_with_rope(model, ids)
    layers = [
        LayerKV(invert_rope(layer.keys, cos, sin), layer.keys, layer.values, positions, cos, sin)
        for layer, (positions, cos, sin) in zip(cache.layers, rope, strict=True)
    ]
    return KVCapture(layers, cache, ids.to(next(model.parameters()).device))


def _rotary_candidates(model: Any, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """``(cos, sin)`` of ``positions`` from every rotary-embedding module of the model, for every layer type it
    takes (transformers calls them ``rotary_emb(x, position_ids[, layer_type])``). Evaluated on CPU copies of the
    modules, whatever the model's device: a GPU's ``cos``/``sin`` differ from the CPU's in the last bits, and the
    encoder inverts RoPE with these values, so a file must not depend on where the model ran (same bytes from every
    device); the results are float32 on the CPU."""
    pos = positions.cpu()[None]
    x = torch.zeros(1, 1, dtype=dtype)
    layer_types = sorted(set(getattr(getattr(model, "config", None), "layer_types", None) or []))
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    layer_types = layer_types or sorted(set(getattr(text_cfg, "layer_types", None) or []))
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        module = _cpu_copy(module)
        for args in [(), *[(t,) for t in layer_types]]:
            try:
                found.append(tuple(t.float() for t in module(x, pos, *args)))
            except (TypeError, KeyError, AttributeError, ValueError):
                continue
    return found


_CPU_ROTARY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cpu_copy(module: Any) -> Any:
    """A CPU copy of a (small) rotary-embedding module, made once per module."""
    if module not in _CPU_ROTARY:
        _CPU_ROTARY[module] = copy.deepcopy(module).cpu()
    return _CPU_ROTARY[module]


@torch.no_grad()
def rope_for_positions(model: Any, num_layers: int, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the ``(cos, sin)`` (each ``(1, n, head_dim)``, float32) the model would apply at ``positions``,
    without running the model over them (a decoder re-applying RoPE to a decoded cache needs this).

    The model's rotary modules are evaluated at ``positions``; which one each layer uses is decided by comparing
    them with what every layer actually receives in a 4-token forward (:class:`RopeRecorder`), so per-layer-type
    RoPE (Gemma3) is matched, not assumed."""
    key = (num_layers, str(next(model.parameters()).device))
    matched = _ROPE_MATCH.get(model, {}).get(key)
    if matched is None:
        matched = _match_rotary(model, num_layers)
        _ROPE_MATCH.setdefault(model, {})[key] = matched
    dtype, which = matched
    full = _rotary_candidates(model, positions, dtype)
    return [full[j] for j in which]


#: per model (weakly held): the rotary tables of positions 0..n-1 already evaluated, and their device copies
_PREFIX_ROPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DYNAMIC_ROPE = ("dynamic", "longrope")  #: rope types whose angles depend on the sequence length


def _rope_types(cfg: Any) -> set[str]:
    found: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("rope_type"), str):
                found.add(x["rope_type"])
            for v in x.values():
                walk(v)

    for name in ("rope_parameters", "rope_scaling"):
        walk(getattr(cfg, name, None))
    return found


def prefix_rope(
    model: Any, num_layers: int, tokens: int, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`rope_for_positions` of positions ``0 .. tokens-1`` on ``device`` (shared per distinct table, see
    :func:`ropes_on`). A model's RoPE at position ``p`` does not depend on the prefix length (except for the
    sequence-length-dependent types, which are evaluated afresh), so the tables are kept per model, grown to the
    longest prefix asked for, and sliced: restoring many prefixes evaluates the rotary modules once (the values
    are exactly those of a fresh evaluation)."""
    cfg = getattr(model, "config", None)
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    if _rope_types(cfg) & set(_DYNAMIC_ROPE) or _rope_types(text_cfg) & set(_DYNAMIC_ROPE):
        return ropes_on(rope_for_positions(model, num_layers, torch.arange(tokens)), torch.device(device))
    held = _PREFIX_ROPE.setdefault(model, {})
    key = num_layers
    if key not in held or held[key]["tokens"] < tokens:
        held[key] = {"tokens": tokens, "cpu": rope_for_positions(model, num_layers, torch.arange(tokens))}
    entry, dev = held[key], str(torch.device(device))
    if dev not in entry:
        entry[dev] = ropes_on(entry["cpu"], torch.device(device))
    return _per_table(entry[dev], lambda cos, sin: (cos[:, :tokens], sin[:, :tokens]))


def _per_table(ropes: list[tuple[torch.Tensor, ...]], fn: Any) -> list[tuple[torch.Tensor, ...]]:
    """``fn(cos, sin)`` of every layer's rotary table, computed once per distinct table (layers sharing a rotary
    module share its tensors, and keep sharing the results)."""
    done: dict[int, tuple[torch.Tensor, ...]] = {}
    for cos, sin in ropes:
        if id(cos) not in done:
            done[id(cos)] = fn(cos, sin)
    return [done[id(cos)] for cos, _ in ropes]


def ropes_on(ropes: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Per layer ``(cos, sin)`` of :func:`rope_for_positions` moved to ``device``: one transfer per distinct rotary
    table (layers sharing a rotary module share its tensors there too), not one per layer."""
    return _per_table(ropes, lambda cos, sin: (cos.to(device, non_blocking=True), sin.to(device, non_blocking=True)))


#: per model (weakly held): which rotary candidate each layer uses, found once by a 4-token forward
_ROPE_MATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _match_rotary(model: Any, num_layers: int) -> tuple[torch.dtype, list[int]]:
    device = next(model.parameters()).device
    with RopeRecorder(model) as rec:
        model(input_ids=torch.zeros(1, 4, dtype=torch.int64, device=device), use_cache=False, logits_to_keep=1)
    dtype = rec.cos_sin(0)[0].dtype
    probes = _rotary_candidates(model, torch.arange(4), dtype)
    which = []
    for i in range(num_layers):
        cos, sin = (t.float().cpu() for t in rec.cos_sin(i))
        match = [j for j, (c, s) in enumerate(probes) if c.shape == cos.shape and torch.allclose(c, cos, atol=1e-5)
                 and torch.allclose(s, sin, atol=1e-5)]  # fmt: skip
        if not match:
            raise RuntimeError(f"layer {i}: no rotary-embedding module of the model reproduces its RoPE")
        which.append(match[0])
    return dtype, which


def rope_model(config: Any) -> Any:
    """A model with the RoPE of ``config`` and nothing else of it: the rotary tables depend on the head size, the
    RoPE parameters and the layer types alone, so this copy is narrowed to one attention head and a token-sized MLP
    (random weights), built in memory; :func:`rope_for_positions` and :func:`prefix_rope` read it as the model."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(getattr(config, "get_text_config", lambda: config)())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for name, value in (("head_dim", head_dim), ("num_attention_heads", 1), ("num_key_value_heads", 1),
                        ("hidden_size", head_dim), ("intermediate_size", 8)):  # fmt: skip
        setattr(cfg, name, value)
    return AutoModelForCausalLM.from_config(cfg).eval()


def rope_of_config(config: Any, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`prefix_rope` (positions ``0 .. tokens-1``, every layer) of a model known only by its ``config``."""
    model = rope_model(config)
    return prefix_rope(model, model.config.num_hidden_layers, tokens)
