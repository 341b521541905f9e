"""Architecture adapter: the facts about a model's KV cache, read from its config, never from module names.

How RoPE is applied per layer is taken from the model itself at run time: every decoder layer hands its attention
module the ``(cos, sin)`` pair it uses (``position_embeddings``), which :class:`kvtool.capture.RopeRecorder`
records. That covers per-layer-type RoPE (Gemma3's sliding layers use their own theta) and norms before RoPE
(Gemma3's ``k_norm``) without knowing the architecture. All supported models rotate the two halves of the head
dimension (``rotate_half``, the GPT-NeoX convention), which :func:`apply_rope` / :func:`invert_rope` implement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from kvtool.digests import sha256_json

FULL = "full_attention"
SLIDING = "sliding_attention"
#: Bound on every size an artifact may record for a model (layers, heads, head_dim, vocabulary, window, ...).
MAX_DIM = 1 << 24


@dataclass(frozen=True)
class ArchInfo:
    """KV-cache geometry of a decoder-only model.

    Attributes
    ----------
    model_type : str
        ``config.model_type`` (``llama``, ``qwen2``, ``mistral``, ``gemma3_text``, ...).
    num_layers, num_kv_heads, num_heads, head_dim : int
        Keys and values of layer ``i`` have shape ``(batch, num_kv_heads, seq_len, head_dim)``.
    layer_types : tuple[str, ...]
        Per layer ``full_attention`` or ``sliding_attention`` (transformers' names).
    sliding_window : int | None
        Window of the sliding layers (their cache keeps the last ``sliding_window - 1`` tokens).
    rope : dict
        RoPE parameters as the config states them (per layer type for models that have several).
    rope_style : str
        ``half``: rotation of the two halves of the head dimension (``rotate_half``).
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rope: dict[str, Any]
    rope_style: str = "half"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ArchInfo:
        """Inverse of :meth:`to_dict` (as recorded in artifacts). Every field is type- and range-checked, since
        the dict comes from a file: ``ValueError`` names the first bad one."""
        if not isinstance(d, dict):
            raise ValueError("model.arch is not an object")
        names = {f.name for f in fields(cls)}
        if set(d) - names or (names - {"rope_style"}) - set(d):
            raise ValueError(f"model.arch fields {sorted(d)} are not {sorted(names)}")
        for key in ("num_layers", "num_kv_heads", "num_heads", "head_dim", "hidden_size", "vocab_size"):
            v = d[key]
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM):
                raise ValueError(f"model.arch.{key} must be an int in 1..{MAX_DIM} (got {v!r})")
        if d["num_heads"] % d["num_kv_heads"]:
            raise ValueError("model.arch.num_heads is not a multiple of num_kv_heads")
        types = d["layer_types"]
        if not (isinstance(types, list) and len(types) == d["num_layers"] and all(t in (FULL, SLIDING) for t in types)):
            raise ValueError(f"model.arch.layer_types must list {d['num_layers']} of {FULL!r} / {SLIDING!r}")
        w = d["sliding_window"]
        if w is not None and not (isinstance(w, int) and not isinstance(w, bool) and 2 <= w <= MAX_DIM):
            raise ValueError(f"model.arch.sliding_window must be null or an int in 2..{MAX_DIM} (got {w!r})")
        if not isinstance(d["model_type"], str) or not isinstance(d["rope"], dict):
            raise ValueError("model.arch.model_type must be a string and rope an object")
        if d.get("rope_style", "half") != "half":
            raise ValueError(f"model.arch.rope_style {d.get('rope_style')!r} is not supported")
        return cls(**{**d, "layer_types": tuple(types)})

    def digest(self) -> str:
        """Digest of everything that decides whether a KV cache or calibration fits this model."""
        return sha256_json(self.to_dict())

    def cached_tokens(self, layer: int, context_len: int) -> int:
        """Tokens layer ``layer`` holds after ``context_len`` tokens (sliding layers keep ``window - 1``)."""
        if self.layer_types[layer] == SLIDING and self.sliding_window:
            return min(context_len, self.sliding_window - 1)
        return context_len

    def kv_elements_per_token(self) -> int:
        """Number of K and V scalars one token adds to the cache (both, all layers)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _layer_types(cfg: Any) -> list[str]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(cfg)
        return list(types)
    except (ImportError, AttributeError):  # older transformers: same rule, stated here
        if getattr(cfg, "layer_types", None):
            return list(cfg.layer_types)
        kind = SLIDING if getattr(cfg, "sliding_window", None) else FULL
        return [kind] * cfg.num_hidden_layers


def _rope_params(cfg: Any) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # transformers < 5
        params = {"rope_theta": getattr(cfg, "rope_theta", None), **(getattr(cfg, "rope_scaling", None) or {})}
    return {k: (v if not isinstance(v, dict) else dict(v)) for k, v in dict(params).items()}


def arch_info(config: Any) -> ArchInfo:
    """Read :class:`ArchInfo` from a transformers config (text config of multimodal models)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    types = _layer_types(cfg)
    sliding = getattr(cfg, "sliding_window", None) if SLIDING in types else None
    return ArchInfo(
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        num_heads=num_heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        layer_types=tuple(types),
        sliding_window=sliding,
        rope=_rope_params(cfg),
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _broadcast(cs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # cos/sin come as (batch, seq, head_dim); keys are (batch, heads, seq, head_dim).
    return cs.unsqueeze(1).to(x.dtype) if cs.dim() == 3 else cs.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pre-RoPE keys ``x`` of shape ``(batch, heads, seq, head_dim)`` by the angles in ``cos``/``sin``
    (shape ``(batch, seq, head_dim)``), exactly as transformers' ``apply_rotary_pos_emb`` does."""
    c, s = _broadcast(cos, x), _broadcast(sin, x)
    return (x * c) + (rotate_half(x) * s)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope`: rotation by the opposite angles, divided by ``cos² + sin²`` so RoPE variants that
    scale ``cos``/``sin`` (YaRN's attention factor) are inverted too. Exact up to floating-point rounding."""
    xf = x.float()
    c, s = _broadcast(cos, xf), _broadcast(sin, xf)
    out = (xf * c - rotate_half(xf) * s) / (c * c + s * s)
    return out.to(x.dtype)


def rope_transpose(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``Rᵀ g`` for the rotation ``R`` of :func:`apply_rope`: maps a gradient with respect to post-RoPE keys to the
    gradient with respect to pre-RoPE keys (``k_post = R k_pre`` so ``dL/dk_pre = Rᵀ dL/dk_post``)."""
    gf = g.float()
    c, s = _broadcast(cos, gf), _broadcast(sin, gf)
    return (gf * c - rotate_half(gf) * s).to(g.dtype)
