"""The one interface for "a transform applied to K and/or V as the attention sees them".

Two levels, like kvpress' ``BasePress``/``ScorerPress``:

* :class:`TensorTransform`: what happens to one ``(batch, kv_heads, tokens, head_dim)`` tensor (quantize then
  dequantize, project then reconstruct) and what it costs in stored bits. One method per file under
  :mod:`kvtool.quantizers` (uniform, non-uniform datatypes, projections, the codec's entropy-coded projection).
* :class:`KVTransform`: per-layer key / value :class:`TensorTransform` plus the settings every method shares and
  every artifact records: whether keys are transformed before RoPE, how many attention-sink tokens and how many
  most-recent tokens stay in fp16.

Bit accounting is honest and explicit: ``nominal`` counts code bits only (KVTuner's convention); ``all_in``
counts everything that must be stored (codes, scales, zero points, fp16 sink and recent tokens), at a stated
context length.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo, apply_rope, invert_rope
from kvtool.errors import ArtifactError

FP16_BITS = 16


@dataclass(frozen=True)
class BitCost:
    """Stored bits per element of one tensor: ``nominal`` (codes only) and ``all_in`` (everything)."""

    nominal: float
    all_in: float


class TensorTransform(ABC):
    """A lossy transform of one K or V tensor of shape ``(batch, kv_heads, tokens, head_dim)``.

    Subclasses are frozen dataclasses registered with :func:`kvtool.config.register`; their fields are the
    hyper-parameters.
    """

    version: ClassVar[int] = 1
    #: Fields holding tensors (lookup tables, thresholds, bases): saved as stacked artifact tensors, not JSON.
    tensor_fields: ClassVar[tuple[str, ...]] = ()

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor field ``name`` (artifacts stack and pad them over layers)."""
        raise NotImplementedError

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of ``x`` (same shape and dtype) as a decoder of the stored form sees it."""

    @abstractmethod
    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        """Bits per element stored for ``num_tokens`` tokens of one head of ``head_dim`` channels."""

    @abstractmethod
    def label(self) -> str:
        """Short human label, e.g. ``int4/token-g64``."""


FP16_MAX = 65504.0  #: the largest finite fp16 value


def fp16_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` stored in fp16 and read back in its own dtype, saturating at ±:data:`FP16_MAX` (no infinities): the
    one fp16 round trip (sink and recent tokens, outliers)."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)


@dataclass
class KVTransform:
    """Per-layer K and V transforms with the shared settings.

    Attributes
    ----------
    keys, values : list[TensorTransform | None]
        One entry per layer; ``None`` keeps the tensor as is.
    keys_pre_rope : bool
        Transform keys before RoPE (they are rotated back, transformed, and rotated again). KVQuant shows
        per-channel key quantization works best pre-RoPE (arXiv:2401.18079, §3.2).
    sink_tokens : int
        The first ``sink_tokens`` positions are kept in fp16 (attention sinks, arXiv:2309.17453).
    recent_tokens : int
        The most recent ``recent_tokens`` tokens are kept in fp16 (KIVI's residual window, arXiv:2402.02750).
    """

    keys: list[TensorTransform | None]
    values: list[TensorTransform | None]
    keys_pre_rope: bool = True
    sink_tokens: int = 0
    recent_tokens: int = 0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError("keys and values need one entry per layer each")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise ValueError("sink_tokens and recent_tokens must be >= 0")

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        key: TensorTransform | None,
        value: TensorTransform | None,
        **settings: Any,
    ) -> KVTransform:
        """The same key and value transform in every layer."""
        return cls([key] * num_layers, [value] * num_layers, **settings)

    @property
    def is_identity(self) -> bool:
        return all(t is None for t in self.keys + self.values)

    # -- applying ---------------------------------------------------------------------------------------------

    def _apply_tokens(self, t: TensorTransform | None, x: torch.Tensor, first_position: int) -> torch.Tensor:
        if t is None:
            return x
        n = x.shape[-2]
        sinks, recent = self.kept_tokens(n, first_position)
        mid = x[..., sinks : n - recent, :]
        parts = [fp16_round_trip(x[..., :sinks, :])] if sinks else []
        if mid.shape[-2]:
            parts.append(t.apply(mid))
        if recent:
            parts.append(fp16_round_trip(x[..., n - recent :, :]))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def apply_layer(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        first_position: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one layer's post-RoPE ``keys`` and ``values`` (``(batch, kv_heads, n, head_dim)``).

        ``cos``/``sin`` (``(batch, n, head_dim)``) are the rotation of these keys; they are needed only when
        ``keys_pre_rope`` is set. ``first_position`` is the position of the first token (for sinks).
        """
        kt, vt = self.keys[layer_idx], self.values[layer_idx]
        if kt is not None:
            if self.keys_pre_rope:
                if cos is None or sin is None:
                    raise ValueError("pre-RoPE key transforms need the layer's cos/sin")
                pre = invert_rope(keys, cos, sin)
                keys = apply_rope(self._apply_tokens(kt, pre, first_position), cos, sin)
            else:
                keys = self._apply_tokens(kt, keys, first_position)
        values = self._apply_tokens(vt, values, first_position)
        return keys, values

    # -- accounting -------------------------------------------------------------------------------------------

    def kept_tokens(self, n: int, first_position: int) -> tuple[int, int]:
        """(sink, recent) token counts kept in fp16 among ``n`` tokens starting at ``first_position``."""
        sinks = min(max(self.sink_tokens - first_position, 0), n)
        return sinks, min(self.recent_tokens, n - sinks)

    def _tokens_cost(self, t: TensorTransform | None, head_dim: int, n: int, first: int) -> tuple[float, float, int]:
        """(nominal bits, all-in bits, transformed tokens) over ``n`` tokens of one head."""
        if t is None or n == 0:
            return FP16_BITS * head_dim * n, FP16_BITS * head_dim * n, n
        sinks, recent = self.kept_tokens(n, first)
        mid = n - sinks - recent
        c = t.cost(head_dim, mid) if mid else BitCost(0.0, 0.0)
        kept = FP16_BITS * head_dim * (sinks + recent)
        return c.nominal * head_dim * mid, c.all_in * head_dim * mid + kept, mid

    def slot_cost(self, t: TensorTransform | None, head_dim: int, n: int, first: int = 0) -> BitCost:
        """Bits per element of one layer's K or V holding ``n`` tokens from position ``first`` under ``t``, with
        this transform's sink and recent settings: ``nominal`` over the transformed tokens, ``all_in`` over all."""
        nom, alli, coded = self._tokens_cost(t, head_dim, n, first)
        return BitCost(nom / (head_dim * coded) if coded else float(FP16_BITS), alli / (head_dim * n))

    def bits(self, arch: ArchInfo, context_len: int) -> dict[str, Any]:
        """Bits per element of the whole cache after ``context_len`` tokens.

        Returns ``{"nominal", "all_in", "context_len", "layers": [{"k_nominal", "k_all_in", "v_nominal",
        "v_all_in"}, ...]}``. ``nominal`` averages code bits over the transformed tokens (fp16 for untouched
        tensors), as KVTuner counts; ``all_in`` divides everything stored by the number of cached elements.
        """
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        per_layer, tot_nom, tot_all, tot_el, tot_nom_el = [], 0.0, 0.0, 0, 0
        for i in range(arch.num_layers):
            n = arch.cached_tokens(i, context_len)
            row: dict[str, float] = {}
            for kind, t in (("k", self.keys[i]), ("v", self.values[i])):
                nom, alli, coded = self._tokens_cost(t, arch.head_dim, n, context_len - n)
                c = self.slot_cost(t, arch.head_dim, n, context_len - n)
                row[f"{kind}_nominal"], row[f"{kind}_all_in"] = c.nominal, c.all_in
                tot_nom += nom
                tot_nom_el += arch.head_dim * coded
                tot_all += alli
                tot_el += arch.head_dim * n
            per_layer.append(row)
        return {
            "nominal": tot_nom / tot_nom_el if tot_nom_el else float(FP16_BITS),
            "all_in": tot_all / tot_el,
            "context_len": context_len,
            "layers": per_layer,
        }

    # -- serialization ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON form: per-layer method configs and the shared settings (recorded in every artifact)."""
        enc = [None if t is None else kvconfig.to_dict(t) for t in self.keys]
        venc = [None if t is None else kvconfig.to_dict(t) for t in self.values]
        return {
            "keys": enc,
            "values": venc,
            "keys_pre_rope": self.keys_pre_rope,
            "sink_tokens": self.sink_tokens,
            "recent_tokens": self.recent_tokens,
            "name": self.name,
        }

    def stacked_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor fields of the per-layer transforms, stacked over layers as ``{k|v}_{field}`` of shape
        ``(layers, *max_shape)``, NaN-padded (layers without the field are all NaN)."""
        out: dict[str, torch.Tensor] = {}
        for kind, slots in (("k", self.keys), ("v", self.values)):
            names = sorted({n for t in slots if t is not None for n in type(t).tensor_fields})
            for name in names:
                parts = [None if t is None or getattr(t, name, None) is None else getattr(t, name) for t in slots]
                present = [p for p in parts if p is not None]
                if not present:
                    continue
                shape = [max(p.shape[d] for p in present) for d in range(present[0].dim())]
                stacked = torch.full((len(slots), *shape), float("nan"), dtype=torch.float32)
                for i, p in enumerate(parts):
                    if p is not None:
                        stacked[(i, *[slice(0, n) for n in p.shape])] = p.float().cpu()
                out[f"{kind}_{name}"] = stacked
        return out

    def bind(self, tensors: dict[str, torch.Tensor]) -> KVTransform:
        """Attach artifact tensors (from :meth:`stacked_tensors`) to the per-layer transforms that declare them."""
        for kind, slots in (("k", self.keys), ("v", self.values)):
            for i, t in enumerate(slots):
                if t is None or not type(t).tensor_fields:
                    continue
                values = {}
                for name in type(t).tensor_fields:
                    key = f"{kind}_{name}"
                    if key in tensors:
                        part = tensors[key][(i, *[slice(0, n) for n in t.tensor_shape(name)])]
                        if not torch.isnan(part).any():
                            values[name] = part.clone()
                slots[i] = dataclasses.replace(t, **values)
        return self

    _FIELDS = frozenset({"keys", "values", "keys_pre_rope", "sink_tokens", "recent_tokens", "name"})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVTransform:
        """Inverse of :meth:`to_dict`; anything malformed is an :class:`~kvtool.errors.ArtifactError`."""
        if not isinstance(d, dict):
            raise ArtifactError(f"KV transform must be a JSON object, got {type(d).__name__}")
        extra = set(d) - cls._FIELDS
        if extra:
            raise ArtifactError(f"KV transform: unknown fields {sorted(extra)}")
        try:
            dec = [None if t is None else kvconfig.from_dict(t) for t in d["keys"]]
            vdec = [None if t is None else kvconfig.from_dict(t) for t in d["values"]]
            return cls(
                dec,
                vdec,
                keys_pre_rope=bool(d["keys_pre_rope"]),
                sink_tokens=int(d["sink_tokens"]),
                recent_tokens=int(d["recent_tokens"]),
                name=str(d.get("name", "custom")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"KV transform: malformed ({type(e).__name__}: {e})") from e
