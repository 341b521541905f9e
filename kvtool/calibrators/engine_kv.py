"""What serving engines load today: static FP8 / NVFP4 KV scales and the layers to keep in the model dtype.

vLLM (``--kv-cache-dtype fp8`` with compressed-tensors scales, ``kv_cache_dtype_skip_layers``), TensorRT-LLM and
ModelOpt (``hf_quant_config.json``, uniform or ``MIXED_PRECISION``) quantize the **post-RoPE** keys and the values
the cache holds, with no sink or recent tokens kept aside. This calibrator measures, on calibration text:

1. **amax** of the cached keys and values per layer and KV head (a forward pass per sequence); the static scale
   of the ``amax`` observer is ``amax / 448`` for FP8 and NVFP4 alike (the checkpoint ``k_scale`` / ``v_scale``
   of both engines' formats), what llm-compressor's ``static_minmax`` observer gives on the same tokens; the
   ``minmax`` observer is llm-compressor's default for KV scales (``llmcompressor/observers/min_max.py``,
   ``MinMaxObserver``): per calibration batch the min and max, averaged over batches as ``old · 0.99 + new · 0.01``
   seeded by the first batch, then ``max(|min|, |max|) / 448``;
2. **clip candidates**: each slot (a layer's keys or values) quantized with its scale times every ``alphas``
   factor, FP8 and NVFP4, and the Fisher-weighted squared error ``Σ g² (x̂ - x)²`` of each (per KV head), from one
   forward and backward pass per sequence (:mod:`kvtool.calibrators.fisher`, post-RoPE gradients). The ``mse``
   observer keeps the factor with the least error (per head for FP8 per-head scales): a clip, only where it
   measurably lowers the loss proxy;
3. **which layers keep the model dtype**: the ``skip_budget`` layers whose FP8/NVFP4 error is largest, or an exact
   multiple-choice knapsack (:mod:`kvtool.calibrators.solver`) over per-layer K/V pairs under an all-in
   ``target_bits`` budget: ``{model dtype, kv_dtype}`` for K and V together (vLLM), or ModelOpt's per-layer
   ``FP8``, ``NVFP4``, ``FP8_K_NVFP4_V`` and unquantized layers (``kv_dtype="mixed"``). ModelOpt's own search
   ranks layers by forward KL under a ``kv_effective_bits`` budget; the diagonal Fisher proxy used here is the
   second-order expansion of that KL's expected loss increase, measured in one pass.

Statistics stream: per sequence only that sequence's K/V and gradients exist; the table is ``(layers, heads,
candidates)`` floats. The artifact records amax, the chosen scales, the table and the module names of each
layer's attention (the checkpoint names engines load scales by).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact
from kvtool.attention import intercepted_attention, transformed_attention
from kvtool.budget import Budget
from kvtool.calibration import calibration_artifact, transform_of
from kvtool.calibrators.fisher import calibration_windows, fisher_stats
from kvtool.calibrators.solver import solve_budget
from kvtool.errors import ArtifactError, UsageError
from kvtool.quantizers.fp8 import E4M3_MAX, Fp8Quantizer
from kvtool.quantizers.nvfp4 import Nvfp4Quantizer
from kvtool.transforms import FP16_BITS, KVTransform, TensorTransform

KV_DTYPES = ("fp8", "nvfp4", "mixed")
#: the quantized formats, in the order of the error table's format axis
DTYPES = ("fp8", "nvfp4")
OBSERVERS = ("amax", "mse", "minmax")
#: how layers are ranked: the Fisher proxy of the passes, or the measured KL of quantizing one layer at a time
SENSITIVITIES = ("fisher", "kl")
#: llm-compressor's MinMaxObserver default ``averaging_constant``
EMA_CONSTANT = 0.01
#: ModelOpt's per-layer KV algorithms (``kv_cache_quantized_layers``), as (key dtype, value dtype)
MODELOPT_PAIRS = {"FP8": ("fp8", "fp8"), "NVFP4": ("nvfp4", "nvfp4"), "FP8_K_NVFP4_V": ("fp8", "nvfp4")}
MODEL_DTYPE = "model dtype"


@kvconfig.register
@dataclass(frozen=True)
class EngineKVCalibration:
    """Settings of the engine-format calibration (the method object is its config; every field is recorded).

    ``kv_dtype``: ``fp8`` or ``nvfp4`` in every layer but the skipped ones, or ``mixed`` (ModelOpt's per-layer
    FP8 / NVFP4 / FP8_K_NVFP4_V / unquantized under ``target_bits``). ``granularity``: FP8 scales per ``tensor`` or
    per KV ``head`` (NVFP4 has one per-tensor scale). ``skip_budget``: layers kept in the model dtype (fp8, nvfp4);
    ``target_bits``: an all-in bits budget instead (required for ``mixed``). ``kl_tokens``: with
    ``sensitivity="kl"``, the per-layer KL is measured on the first this many tokens of the first calibration
    sequence (``None``: all of it); layers × 3 forward passes over them, so fewer tokens cost far less time, and
    rank the layers less well (SmolLM2, 512 of 2,048: docs/benchmarks.md).
    """

    version: ClassVar[int] = 1
    kv_dtype: Literal["fp8", "nvfp4", "mixed"] = "fp8"
    granularity: Literal["tensor", "head"] = "tensor"
    observer: Literal["amax", "mse", "minmax"] = "amax"
    sensitivity: Literal["fisher", "kl"] = "fisher"
    skip_budget: int = 0
    target_bits: float | None = None
    alphas: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    num_seqs: int = 8
    seq_len: int = 2048
    seed: int = 0
    kl_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise UsageError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (got '{self.kv_dtype}')")
        if self.granularity not in ("tensor", "head"):
            raise UsageError(f"granularity must be tensor or head (got '{self.granularity}')")
        if self.observer not in OBSERVERS:
            raise UsageError(f"observer must be one of {', '.join(OBSERVERS)} (got '{self.observer}')")
        if self.sensitivity not in SENSITIVITIES:
            raise UsageError(f"sensitivity must be one of {', '.join(SENSITIVITIES)} (got '{self.sensitivity}')")
        if self.skip_budget < 0:
            raise UsageError(f"skip_budget must be >= 0 (got {self.skip_budget})")
        if self.skip_budget and self.target_bits is not None:
            raise UsageError("give skip_budget or target_bits, not both")
        if self.kv_dtype == "mixed" and self.target_bits is None:
            raise UsageError("kv_dtype mixed needs target_bits (an all-in bits budget, e.g. 5.0)")
        if self.kv_dtype == "mixed" and self.skip_budget:
            raise UsageError("kv_dtype mixed chooses its unquantized layers under target_bits: drop skip_budget")
        if self.target_bits is not None and not 4.5 <= self.target_bits <= FP16_BITS:
            raise UsageError(f"target_bits must be in [4.5, 16] for FP8/NVFP4 layers (got {self.target_bits})")
        if not self.alphas or self.alphas[0] != 1.0 or any(not 0.0 < a <= 1.0 for a in self.alphas):
            raise UsageError(f"alphas must start with 1.0 (amax) and lie in (0, 1] (got {self.alphas})")
        if self.num_seqs < 1 or self.seq_len < 16:
            raise UsageError("need at least one calibration sequence of at least 16 tokens")
        if self.kl_tokens is not None and (not isinstance(self.kl_tokens, int) or isinstance(self.kl_tokens, bool)
                                           or self.kl_tokens < 16):  # fmt: skip
            raise UsageError(f"kl_tokens must be an integer >= 16 (got {self.kl_tokens!r})")

    # -- the calibrator protocol (kvtool.calibrators.base) --------------------------------------------------------

    def describe(self, arch: ArchInfo) -> str:
        what = "FP8/NVFP4 mixed" if self.kv_dtype == "mixed" else self.kv_dtype.upper()
        return (f"measuring {what} KV scales ({self.observer} observer) and layer sensitivity on "
                f"{self.num_seqs} x {self.seq_len} tokens")  # fmt: skip

    def outputs(self) -> dict[int, str]:
        return {0: ".kvcal.safetensors"}

    @property
    def passes(self) -> int:
        return 2 + (self.sensitivity == "kl")  # the range pass, the Fisher pass, and the per-layer KL

    def fit(self, lm: Any, ids: torch.Tensor, *, special_prefix: list[int],
            progress: Callable[[int], None] | None = None) -> EngineTable:  # fmt: skip
        return measure_engine_table(lm.model, lm.arch, ids, self, progress=progress, special_prefix=special_prefix)

    def solve(self, table: EngineTable, budget: Budget | None = None) -> KVTransform:
        if budget is not None and budget.bits is None:
            raise UsageError(f"budget '{budget.label()}': an engine calibration is solved for bits")
        method = self if budget is None else dataclasses.replace(self, target_bits=budget.bits, skip_budget=0)
        return engine_transform(method, table, choose_layers(method, table))

    def artifacts(self, record: dict[str, Any], inputs: dict[str, Any], table: EngineTable) -> dict[int, Artifact]:
        return {0: engine_artifact(self, record, inputs, table)}

    def chooses_skips_by_quality(self) -> bool:
        """Whether a quality gate (``--max-ppl-delta``) picks the skipped layers: FP8 or NVFP4 with neither a skip
        budget nor a bits budget given."""
        return self.kv_dtype != "mixed" and not self.skip_budget and self.target_bits is None

    def pairs(self) -> dict[str, tuple[str, str] | None]:
        """The per-layer (key dtype, value dtype) choices: a layer kept in the model dtype is ``None``."""
        if self.kv_dtype == "mixed":
            return {MODEL_DTYPE: None, **MODELOPT_PAIRS}
        return {MODEL_DTYPE: None, self.kv_dtype.upper(): (self.kv_dtype, self.kv_dtype)}


@dataclass
class EngineTable:
    """What calibration measured.

    ``amax[kind]``: ``(layers, heads)`` max |x| of the cached keys (``"k"``, post-RoPE) or values;
    ``error[kind]``: ``(layers, heads, 2, len(alphas))`` Fisher-weighted squared error of FP8 (index 0 on axis 2;
    scale per ``granularity``) and NVFP4 (index 1) at scale × alpha; ``tokens``: ``(layers,)`` tokens each layer
    caches at ``seq_len`` tokens of context (sliding layers fewer); ``modules``: each layer's attention module name
    in the model (the checkpoint prefix of its scales); ``kv_proj``: its key / value projection names, if separate.
    """

    amax: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    tokens: np.ndarray
    head_dim: int
    alphas: list[float]
    granularity: str
    modules: list[str | None]
    kv_proj: list[dict[str, str] | None]
    #: ``(layers, 3)`` measured KL of quantizing one layer alone as each of ModelOpt's formats (``sensitivity="kl"``)
    kl: np.ndarray | None = None
    #: ``(windows, layers, heads)`` per calibration sequence min / max of the cached K (``"k"``) or V, for the
    #: ``minmax`` observer
    window_min: dict[str, np.ndarray] = field(default_factory=dict)
    window_max: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def elements(self) -> np.ndarray:
        """``(layers,)`` cached K (or V) elements per layer."""
        return self.tokens * self.amax["k"].shape[1] * self.head_dim

    def per_head(self, dtype: str) -> bool:
        """Whether a slot in ``dtype`` has one scale per KV head (FP8 with per-head granularity)."""
        return dtype == "fp8" and self.granularity == "head"

    def _errors(self, kind: str, layer: int, dtype: str) -> np.ndarray:
        """``(heads, alphas)`` measured errors of a slot in ``dtype``."""
        return self.error[kind][layer][:, DTYPES.index(dtype)]

    def _scaled(self, kind: str, layer: int, dtype: str, alpha: np.ndarray | float) -> torch.Tensor:
        """The amax of a slot (per head or over the heads) times ``alpha`` (a clip factor, or one per head) over
        448: both engines' checkpoint scales are ``amax / 448``. Float32, ``(heads,)`` or ``(1,)``."""
        amax = self.amax[kind][layer]
        base = amax if self.per_head(dtype) else np.array([amax.max()])
        return torch.tensor(np.maximum(base * alpha / E4M3_MAX, np.finfo(np.float32).tiny), dtype=torch.float32)

    def candidate_scales(self, kind: str, layer: int, dtype: str) -> list[torch.Tensor]:
        """The scale of a slot at every clip factor: what the Fisher pass measures."""
        return [self._scaled(kind, layer, dtype, a) for a in self.alphas]

    def scale(self, kind: str, layer: int, dtype: str, observer: str) -> torch.Tensor:
        """The static scale of a slot: FP8 ``(1,)`` or ``(heads,)``, NVFP4 ``(1,)`` (float32); for ``amax`` and
        ``mse`` exactly one of :meth:`candidate_scales`."""
        per_head = self.per_head(dtype)
        if observer == "minmax":
            return self._ema_scale(kind, layer, per_head)
        err = self._errors(kind, layer, dtype)
        if observer == "amax":
            pick = np.zeros(len(err) if per_head else 1, dtype=np.int64)
        else:
            pick = err.argmin(-1) if per_head else np.array([err.sum(0).argmin()])
        return self._scaled(kind, layer, dtype, np.asarray(self.alphas)[pick])

    def _ema_scale(self, kind: str, layer: int, per_head: bool) -> torch.Tensor:
        """llm-compressor's ``MinMaxObserver``: the per-batch min and max (over all heads unless ``per_head``),
        averaged over batches as ``old · (1 - c) + new · c`` from the first batch, then ``max(|min|, |max|) / 448``
        (``calculate_qparams`` clamps min ≤ 0 ≤ max)."""
        lo, hi = self.window_min[kind][:, layer], self.window_max[kind][:, layer]  # (windows, heads)
        if not per_head:
            lo, hi = lo.min(1, keepdims=True), hi.max(1, keepdims=True)
        ema_lo, ema_hi = lo[0].copy(), hi[0].copy()
        for w in range(1, len(lo)):
            ema_lo = ema_lo * (1 - EMA_CONSTANT) + lo[w] * EMA_CONSTANT
            ema_hi = ema_hi * (1 - EMA_CONSTANT) + hi[w] * EMA_CONSTANT
        s = np.maximum(np.abs(np.minimum(ema_lo, 0)), np.maximum(ema_hi, 0)) / E4M3_MAX
        return torch.tensor(np.maximum(s, np.finfo(np.float32).tiny), dtype=torch.float32)

    def slot_error(self, kind: str, layer: int, dtype: str, observer: str) -> float:
        """The proxy error of a slot under the scale :meth:`scale` picks (the ``minmax`` observer's moving average
        is not on the measured grid: its amax column stands for it)."""
        err = self._errors(kind, layer, dtype)
        if observer in ("amax", "minmax"):
            return float(err[:, 0].sum())
        if self.per_head(dtype):
            return float(err.min(-1).sum())
        return float(err.sum(0).min())


def _engine_quantizer(dtype: str, scale: torch.Tensor, per_head: bool) -> TensorTransform:
    """FP8 (one scale per tensor, or per KV head) or NVFP4 with a static ``scale``."""
    if dtype == "nvfp4":
        return Nvfp4Quantizer(scale)
    return Fp8Quantizer("head", scale.numel(), scale) if per_head else Fp8Quantizer("tensor", 0, scale)


def quantizer(table: EngineTable, kind: str, layer: int, dtype: str, observer: str) -> TensorTransform:
    """The engine quantizer of a slot with its calibrated static scale."""
    return _engine_quantizer(dtype, table.scale(kind, layer, dtype, observer), table.per_head(dtype))


def _candidates(table: EngineTable, kind: str, layer: int) -> list[TensorTransform]:
    """FP8 then NVFP4 quantizers of one slot at every clip factor (amax from the range pass)."""
    return [_engine_quantizer(d, s, table.per_head(d)) for d in DTYPES for s in table.candidate_scales(kind, layer, d)]


def attention_modules(model: Any, num_layers: int) -> tuple[list[str | None], list[dict[str, str] | None]]:
    """Each layer's attention module name (``model.layers.3.self_attn`` in Llama, Qwen2, Mistral, Gemma3) and, where
    it has separate key / value projections, their names: found through the ``layer_idx`` transformers' attention
    modules carry, not by assuming a model's module names."""
    names: list[str | None] = [None] * num_layers
    proj: list[dict[str, str] | None] = [None] * num_layers
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or not 0 <= idx < num_layers or not type(module).__name__.endswith("Attention"):
            continue
        if names[idx] is None:
            names[idx] = name
            children = dict(module.named_children())
            if "k_proj" in children and "v_proj" in children:
                proj[idx] = {"k": f"{name}.k_proj", "v": f"{name}.v_proj"}
    return names, proj


@torch.no_grad()
def _range_pass(model: Any, windows: list[torch.Tensor], layers: int, heads: int,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """``{"k_min", "k_max", "v_min", "v_max"}``: ``(windows, layers, heads)`` min and max of the cached keys and
    values per window, layer and KV head (forward passes only)."""
    out = {f"{k}_{m}": torch.zeros(len(windows), layers, heads, dtype=torch.float64)
           for k in ("k", "v") for m in ("min", "max")}  # fmt: skip
    device = next(model.parameters()).device
    w = 0

    def observe(layer: int, key: torch.Tensor, value: torch.Tensor, cos: Any, sin: Any):
        for kind, x in (("k", key), ("v", value)):
            xf = x.detach().float()
            out[f"{kind}_min"][w, layer] = xf.amin(dim=(0, 2, 3)).double().cpu()
            out[f"{kind}_max"][w, layer] = xf.amax(dim=(0, 2, 3)).double().cpu()
        return key, value

    with intercepted_attention(model, observe):
        for w, ids in enumerate(windows):  # noqa: B007 - ``observe`` reads the window index
            model(input_ids=ids[None].to(device), use_cache=False)
            if progress:
                progress(1)
    return {k: v.numpy() for k, v in out.items()}


def measure_engine_table(
    model: Any,
    arch: ArchInfo,
    token_ids: torch.Tensor,
    cal: EngineKVCalibration,
    progress: Callable[[int], None] | None = None,
    special_prefix: list[int] | tuple[int, ...] = (),
) -> EngineTable:
    """The streaming passes (ranges, then Fisher-weighted errors of every clip candidate, then with
    ``sensitivity="kl"`` the per-layer KL on the first window) on the calibration windows of ``token_ids`` (see
    :func:`~kvtool.calibrators.fisher.calibration_windows`)."""
    windows = calibration_windows(token_ids, cal.seq_len, cal.num_seqs, cal.seed, special_prefix)
    layers, heads = arch.num_layers, arch.num_kv_heads
    modules, kv_proj = attention_modules(model, layers)
    ranges = _range_pass(model, windows, layers, heads, progress)
    table = EngineTable(
        amax={k: np.maximum(-ranges[f"{k}_min"], ranges[f"{k}_max"]).max(0) for k in ("k", "v")},
        error={k: np.zeros((layers, heads, 2, len(cal.alphas))) for k in ("k", "v")},
        tokens=np.array([arch.cached_tokens(i, cal.seq_len) for i in range(layers)], dtype=np.float64),
        head_dim=arch.head_dim,
        alphas=list(cal.alphas),
        granularity=cal.granularity,
        modules=modules,
        kv_proj=kv_proj,
        window_min={k: ranges[f"{k}_min"] for k in ("k", "v")},
        window_max={k: ranges[f"{k}_max"] for k in ("k", "v")},
    )
    n = len(cal.alphas)
    for stats in fisher_stats(model, windows, post_rope=True):
        for i, st in enumerate(stats):
            for kind, x, g in (("k", st.keys, st.key_grad), ("v", st.values, st.value_grad)):
                g2 = g.square()
                errs = [(g2 * (c.apply(x) - x).square()).sum(dim=(0, 2, 3)) for c in _candidates(table, kind, i)]
                e = torch.stack(errs, dim=-1).double().cpu().numpy()  # (heads, 2 * alphas)
                table.error[kind][i] += e.reshape(heads, 2, n)
        if progress:
            progress(1)
    if cal.sensitivity == "kl":
        # on the first kl_tokens of the first window (the passes' cost grows faster than the tokens: SmolLM2 on 2
        # cores, a forward of 2,048 tokens takes 6.0 s, of 512 1.3 s)
        table.kl = _layer_kl(model, windows[0][: cal.kl_tokens], table, cal)
        if progress:
            progress(cal.num_seqs)
    return table


@torch.no_grad()
def _layer_kl(model: Any, ids: torch.Tensor, table: EngineTable, cal: EngineKVCalibration) -> np.ndarray:
    """ModelOpt's layer score, measured: the mean KL(p_model ‖ p_quantized) over the next-token distributions of
    one calibration sequence ``ids`` when only layer ``i``'s K/V are quantized as each of ``MODELOPT_PAIRS``
    (``layers × 3`` forward passes). Summed over layers it is the search's error (additive, as ModelOpt assumes).

    Layers before ``i`` see exactly what they saw in the unquantized pass, so their outputs are recorded once and
    replayed (:class:`_Replay`): each pass computes only layers ``i ..`` — the same numbers, about half the work."""
    layers = len(table.tokens)
    x = ids[None].to(next(model.parameters()).device)
    blocks = decoder_layers(model, table.modules)
    with _Replay(blocks) as replay:
        ref = F.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), -1)
        p_ref = ref.exp()
        out = np.zeros((layers, len(MODELOPT_PAIRS)))
        for i in range(layers):
            replay.upto(i)
            for j, (kd, vd) in enumerate(MODELOPT_PAIRS.values()):
                keys: list[TensorTransform | None] = [None] * layers
                values: list[TensorTransform | None] = [None] * layers
                keys[i] = quantizer(table, "k", i, kd, cal.observer)
                values[i] = quantizer(table, "v", i, vd, cal.observer)
                with transformed_attention(model, KVTransform(keys, values, keys_pre_rope=False)):
                    logp = F.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), -1)
                out[i, j] = float((p_ref * (ref - logp)).sum(-1).clamp_min(0).mean())
    return out


def decoder_layers(model: Any, attention: list[str | None]) -> list[torch.nn.Module] | None:
    """Each layer's decoder block: the module holding its attention module (``model.layers.3`` for
    ``model.layers.3.self_attn``), found from the attention modules' names (:func:`attention_modules`), not
    assumed. ``None`` when a layer has no attention module found or two layers share a block."""
    if any(name is None or "." not in name for name in attention):
        return None
    blocks = [model.get_submodule(name.rsplit(".", 1)[0]) for name in attention]  # type: ignore[union-attr]
    return blocks if len({id(b) for b in blocks}) == len(blocks) else None


def _copy(out: Any) -> Any:
    """A block's output with its tensors copied (a later block may not modify what is replayed)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copy(o) for o in out)
    return out


class _Replay:
    """Records every decoder block's output during the first forward pass under it, then (after
    :meth:`upto` ``(i)``) makes blocks ``0 .. i-1`` return their recorded outputs instead of computing them: valid
    while their inputs are those of the recorded pass (same ids, nothing before block ``i`` changed)."""

    def __init__(self, blocks: list[torch.nn.Module] | None):
        self.blocks = blocks or []
        self.outputs: dict[int, Any] = {}
        self.hooks: list[Any] = []

    def __enter__(self) -> _Replay:
        for j, block in enumerate(self.blocks):
            record = lambda _m, _a, out, j=j: self.outputs.setdefault(j, _copy(out))  # noqa: E731
            self.hooks.append(block.register_forward_hook(record))
        return self

    def upto(self, i: int) -> None:
        for h in self.hooks:  # the recording pass is over
            h.remove()
        self.hooks = []
        if len(self.outputs) != len(self.blocks):  # not every block ran in the recorded pass: compute them all
            i = 0
        for j, block in enumerate(self.blocks):
            if j < i:
                block.forward = lambda *_a, j=j, **_k: self.outputs[j]
            elif "forward" in block.__dict__:
                del block.forward

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()
        for block in self.blocks:
            if "forward" in block.__dict__:
                del block.forward


# -- choosing the layers ------------------------------------------------------------------------------------------


def _pair_bits(head_dim: int, tokens: int, pair: tuple[str, str] | None) -> float:
    """All-in bits per element of one layer's K and V together under ``pair`` (``None``: the model dtype)."""
    if pair is None:
        return float(FP16_BITS)
    costs = {"fp8": Fp8Quantizer().cost(head_dim, tokens).all_in,
             "nvfp4": Nvfp4Quantizer().cost(head_dim, tokens).all_in}  # fmt: skip
    return (costs[pair[0]] + costs[pair[1]]) / 2


def _pair_error(cal: EngineKVCalibration, table: EngineTable, layer: int, pair: tuple[str, str]) -> float:
    """A layer's error as (key dtype, value dtype): its measured KL, or the summed Fisher proxy of its slots."""
    if cal.sensitivity == "kl":
        if table.kl is None:
            raise ArtifactError("sensitivity kl: this calibration has no measured per-layer KL")
        return float(table.kl[layer, list(MODELOPT_PAIRS.values()).index(pair)])
    return table.slot_error("k", layer, pair[0], cal.observer) + table.slot_error("v", layer, pair[1], cal.observer)


def choose_layers(cal: EngineKVCalibration, table: EngineTable) -> list[str]:
    """The per-layer choice (keys of :meth:`EngineKVCalibration.pairs`): the ``skip_budget`` most sensitive layers
    kept in the model dtype, or the least total proxy error under ``target_bits``, or every layer quantized."""
    pairs = cal.pairs()
    names = list(pairs)
    layers = len(table.tokens)
    quant = names[1] if cal.kv_dtype != "mixed" else None
    if cal.target_bits is None:
        sens = [_pair_error(cal, table, i, (cal.kv_dtype, cal.kv_dtype)) for i in range(layers)]
        skipped = set(np.argsort(sens, kind="stable")[::-1][: cal.skip_budget].tolist())
        return [MODEL_DTYPE if i in skipped else str(quant) for i in range(layers)]
    costs, errors = [], []
    for i in range(layers):
        costs.append(np.array([_pair_bits(table.head_dim, int(table.tokens[i]), p) for p in pairs.values()]))
        errors.append(np.array([0.0 if p is None else _pair_error(cal, table, i, p) for p in pairs.values()]))
    picks = solve_budget(costs, errors, list(table.elements), float(cal.target_bits))
    return [names[j] for j in picks]


def engine_transform(cal: EngineKVCalibration, table: EngineTable, choice: list[str]) -> KVTransform:
    """The per-layer transform of a choice: engine quantizers on post-RoPE keys and values, no fp16 tokens."""
    pairs = cal.pairs()
    keys: list[TensorTransform | None] = []
    values: list[TensorTransform | None] = []
    for i, name in enumerate(choice):
        pair = pairs[name]
        keys.append(None if pair is None else quantizer(table, "k", i, pair[0], cal.observer))
        values.append(None if pair is None else quantizer(table, "v", i, pair[1], cal.observer))
    label = "mixed" if cal.kv_dtype == "mixed" else cal.kv_dtype
    return KVTransform(keys, values, keys_pre_rope=False, sink_tokens=0, recent_tokens=0,
                       name=f"engine-{label}-{cal.observer}")  # fmt: skip


# -- artifact -----------------------------------------------------------------------------------------------------


def engine_artifact(cal: EngineKVCalibration, record: dict[str, Any], inputs: dict[str, Any],
                    table: EngineTable) -> Artifact:  # fmt: skip
    choice = choose_layers(cal, table)
    transform = engine_transform(cal, table, choice)
    tensors = {f"{k}_amax": torch.from_numpy(table.amax[k].copy()) for k in ("k", "v")}
    tensors |= {f"{k}_clip_error": torch.from_numpy(table.error[k].copy()) for k in ("k", "v")}
    tensors |= {f"{k}_window_{m}": torch.from_numpy(getattr(table, f"window_{m}")[k].copy())
                for k in ("k", "v") for m in ("min", "max")}  # fmt: skip
    tensors["layer_tokens"] = torch.from_numpy(table.tokens.copy())
    if table.kl is not None:
        tensors["layer_kl"] = torch.from_numpy(table.kl.copy())
    extra = {"engine": {
        "choice": choice,
        "skip_layers": [i for i, c in enumerate(choice) if c == MODEL_DTYPE],
        "modules": table.modules,
        "kv_proj": table.kv_proj,
        "alphas": table.alphas,
        "granularity": table.granularity,
        "sensitivity": [
            {kind: {d: table.slot_error(kind, i, d, cal.observer) for d in DTYPES} for kind in ("k", "v")}
            for i in range(len(choice))
        ],
    }}  # fmt: skip
    return calibration_artifact(record, cal, inputs, transform, extra, tensors, cal.seq_len)


def engine_table_from(art: Artifact) -> tuple[EngineKVCalibration, EngineTable]:
    """Inverse of :func:`engine_artifact`'s table part (for re-solving and exports)."""
    method = kvconfig.from_dict(art.method)
    if not isinstance(method, EngineKVCalibration):
        raise ArtifactError(f"made by {type(method).__name__}, not the engine calibration")
    try:
        eng = art.extra["engine"]
        table = EngineTable(
            amax={k: art.tensors[f"{k}_amax"].numpy() for k in ("k", "v")},
            error={k: art.tensors[f"{k}_clip_error"].numpy() for k in ("k", "v")},
            tokens=art.tensors["layer_tokens"].numpy(),
            head_dim=ArchInfo.from_dict(art.model["arch"]).head_dim,
            alphas=list(eng["alphas"]),
            granularity=str(eng["granularity"]),
            modules=list(eng["modules"]),
            kv_proj=list(eng["kv_proj"]),
            window_min={k: art.tensors[f"{k}_window_min"].numpy() for k in ("k", "v")},
            window_max={k: art.tensors[f"{k}_window_max"].numpy() for k in ("k", "v")},
            kl=art.tensors["layer_kl"].numpy() if "layer_kl" in art.tensors else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"malformed engine calibration record ({type(e).__name__}: {e})") from None
    return method, table


def resolve_engine(art: Artifact, budget: Budget) -> tuple[Artifact, KVTransform]:
    """Re-choose an engine calibration's layers for an all-in bits budget, without the model."""
    method, table = engine_table_from(art)
    if budget.bits is None:
        raise UsageError(f"budget '{budget.label()}': an engine calibration is re-solved for bits, e.g. 5.0")
    cal = dataclasses.replace(method, target_bits=budget.bits, skip_budget=0)
    new = engine_artifact(cal, art.model, art.inputs, table)
    return new, transform_of(new)
