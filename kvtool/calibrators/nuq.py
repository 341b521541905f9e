"""Calibrated non-uniform KV datatypes (KVQuant, arXiv:2401.18079), with GQA and without its pitfalls.

From the Fisher passes of :mod:`kvtool.calibrators.fisher` (gradients of the loss with respect to pre-RoPE keys and
values, accumulated per calibration sequence, nothing dumped to disk), per layer:

* **key thresholds** per (KV head, channel): the ``outlier_frac / 2`` and ``1 - outlier_frac / 2`` percentiles of
  the pre-RoPE keys over all calibration tokens (sinks excluded): KVQuant's per-channel pre-RoPE normalisation;
* **lookup tables**: for keys (normalised by those thresholds) and values (normalised per token at run time, as
  the runtime does), a Fisher-weighted 1-D k-means of the inlier values, run on a fine weighted histogram
  (``bins`` bins over ``[-1, 1]``) instead of on millions of raw points (KVQuant runs sklearn on all of them);
* optional **Q-Norm** scalars that restore the mean and standard deviation of the normalised data.

Every bit width in ``bits`` comes out of the same passes; each becomes one per-layer
:class:`~kvtool.transforms.KVTransform` of :class:`~kvtool.quantizers.NonUniformQuantizer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact
from kvtool.budget import Budget
from kvtool.calibrators.fisher import LayerStats, accumulate
from kvtool.errors import UsageError
from kvtool.quantizers.nonuniform import NonUniformQuantizer
from kvtool.transforms import KVTransform


@kvconfig.register
@dataclass(frozen=True)
class NUQCalibration:
    """Settings of the non-uniform datatype calibration (recorded in the artifact)."""

    version: ClassVar[int] = 1
    bits: list[int] = field(default_factory=lambda: [2, 3, 4])
    outlier_frac: float = 0.01
    sink_tokens: int = 1
    qnorm: bool = False
    num_seqs: int = 8
    seq_len: int = 2048
    seed: int = 0
    bins: int = 4096
    kmeans_iters: int = 100
    weighting: str = "fisher"  #: k-means sample weights: "fisher" (g², KVQuant) or "count" (plain k-means)

    def __post_init__(self) -> None:
        if not self.bits or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.bits):
            raise UsageError(f"bits must be integers in 1..8 (got {self.bits})")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise UsageError(f"outlier_frac must be in [0, 0.5) (got {self.outlier_frac})")
        if self.weighting not in ("fisher", "count"):
            raise UsageError(f"weighting must be 'fisher' or 'count' (got '{self.weighting}')")
        if self.num_seqs < 1 or self.seq_len <= self.sink_tokens or self.sink_tokens < 0:
            raise UsageError("need calibration sequences longer than the sink tokens")

    # -- the calibrator protocol (kvtool.calibrators.base) --------------------------------------------------------

    def describe(self, arch: ArchInfo) -> str:
        return f"fitting non-uniform datatypes for {self.bits} bits on {self.num_seqs} x {self.seq_len} tokens"

    def outputs(self) -> dict[int, str]:
        return {b: f".nuq{b}.kvcal.safetensors" for b in sorted(set(self.bits))}

    def fit(self, lm: Any, ids: torch.Tensor, *, special_prefix: list[int],
            progress: Callable[[int], None] | None = None) -> dict[int, KVTransform]:  # fmt: skip
        """The table of this method is its fitted transforms, one per bit width."""
        return fit_nuq(lm.model, lm.arch, ids, self, progress=progress, special_prefix=special_prefix)

    def solve(self, table: dict[int, KVTransform], budget: Budget | None = None) -> KVTransform:
        if budget is None and len(table) == 1:
            return next(iter(table.values()))
        bits = None if budget is None else budget.bits
        if bits is None or int(bits) != bits or int(bits) not in table:
            raise UsageError(f"a nuq calibration is solved for one of its bit widths {sorted(table)}")
        return table[int(bits)]

    def artifacts(self, record: dict[str, Any], inputs: dict[str, Any],
                  table: dict[int, KVTransform]) -> dict[int, Artifact]:  # fmt: skip
        from kvtool.calibration import calibration_artifact

        return {b: calibration_artifact(record, self, inputs, t, {"nuq": {"bits": b}}, {}, self.seq_len)
                for b, t in table.items()}  # fmt: skip


def _histogram(a: torch.Tensor, w: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted histogram of inliers ``a`` in ``[-1, 1]``: (bin centres, summed weights), float64."""
    idx = ((a.clamp(-1, 1) + 1) * (bins / 2)).long().clamp_(0, bins - 1)
    hist = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w.double())
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * (2 / bins) - 1
    return centres, hist


def weighted_kmeans_1d(centres: torch.Tensor, weights: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Lloyd's k-means on weighted points of a line; deterministic. Starts at the weighted quantiles.

    Returns ``k`` sorted float32 levels. Empty clusters keep their previous level.
    """
    w = weights.clamp_min(0) + 1e-12 * weights.sum().clamp_min(1e-30)  # every bin a little weight: no empty data
    cdf = torch.cumsum(w, 0) / w.sum()
    levels = centres[torch.searchsorted(cdf, (torch.arange(k, dtype=torch.float64) + 0.5) / k).clamp_max(len(w) - 1)]
    for _ in range(iters):
        assign = torch.bucketize(centres, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)
        moment = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w * centres)
        new = torch.where(mass > 0, moment / mass.clamp_min(1e-300), levels).sort().values
        if torch.equal(new, levels):
            break
        levels = new
    return levels.float()


@dataclass
class _LayerAccumulator:
    """Everything one layer needs across calibration sequences."""

    keys: list[torch.Tensor] = field(default_factory=list)  # (tokens, heads, head_dim)
    key_g2: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    value_g2: list[torch.Tensor] = field(default_factory=list)


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """``(1, heads, tokens, head_dim)`` → ``(tokens, heads, head_dim)``."""
    return x[0].permute(1, 0, 2).contiguous()


class NuqAccumulator:
    """Collects, layer by layer, what the fit needs from the Fisher passes (sinks excluded)."""

    def __init__(self, arch: ArchInfo, cfg: NUQCalibration):
        self.arch, self.cfg = arch, cfg
        self.layers = [_LayerAccumulator() for _ in range(arch.num_layers)]

    def add(self, stats: list[LayerStats]) -> None:
        for i, st in enumerate(stats):
            n = st.keys.shape[-2]
            sinks = max(0, self.cfg.sink_tokens - (self.cfg.seq_len - n))  # sliding layers hold recent tokens only
            acc = self.layers[i]
            acc.keys.append(_tokens_major(st.keys[..., sinks:, :]))
            acc.key_g2.append(_tokens_major(st.key_grad[..., sinks:, :].square()))
            acc.values.append(_tokens_major(st.values[..., sinks:, :]))
            acc.value_g2.append(_tokens_major(st.value_grad[..., sinks:, :].square()))

    def fit(self) -> dict[int, KVTransform]:
        """One per-layer transform per bit width (thresholds, Fisher-weighted LUTs, optional Q-Norm)."""
        cfg, arch = self.cfg, self.arch
        out: dict[int, tuple[list[NonUniformQuantizer], list[NonUniformQuantizer]]] = {b: ([], []) for b in cfg.bits}
        q = cfg.outlier_frac / 2
        shape = {"heads": arch.num_kv_heads, "head_dim": arch.head_dim, "outlier_frac": cfg.outlier_frac}
        for layer in self.layers:
            keys, kg2 = torch.cat(layer.keys), torch.cat(layer.key_g2)  # (T, H, D)
            values, vg2 = torch.cat(layer.values), torch.cat(layer.value_g2)
            flat = keys.reshape(keys.shape[0], -1)
            lo = (torch.quantile(flat, q, dim=0) if q else flat.amin(0)).reshape(keys.shape[1:])
            hi = (torch.quantile(flat, 1 - q, dim=0) if q else flat.amax(0)).reshape(keys.shape[1:])
            for slot, x, g2, base in (
                (0, keys, kg2, NonUniformQuantizer(1, "channel", thr_lo=lo, thr_hi=hi, **shape)),
                (1, values, vg2, NonUniformQuantizer(1, "token", **shape)),
            ):
                for b, fitted in _fit_tables(base, x, g2, cfg).items():
                    out[b][slot].append(fitted)
        return {
            b: KVTransform(ks, vs, keys_pre_rope=True, sink_tokens=cfg.sink_tokens, name=f"nuq{b}")
            for b, (ks, vs) in out.items()
        }


def _fit_tables(
    base: NonUniformQuantizer, x: torch.Tensor, g2: torch.Tensor, cfg: NUQCalibration
) -> dict[int, NonUniformQuantizer]:
    """LUTs of every bit width for one slot: weighted k-means on the histogram of the normalised inliers."""
    a, _, _ = base.normalize(x.permute(1, 0, 2)[None])  # (T, H, D) -> (1, H, T, D)
    a = a[0].permute(1, 0, 2).reshape(-1)
    w = g2.reshape(-1) if cfg.weighting == "fisher" else torch.ones_like(a)
    inlier = a.abs() <= 1
    centres, hist = _histogram(a[inlier], w[inlier], cfg.bins)
    fitted = {}
    for b in cfg.bits:
        lut = weighted_kmeans_1d(centres, hist, 1 << b, cfg.kmeans_iters)
        fitted[b] = dataclasses.replace(base, bits=b, lut=lut)
        if cfg.qnorm:
            ai = a[inlier]
            deq = lut[fitted[b].codes(ai)]
            s = float(ai.std() / deq.std().clamp_min(1e-12))
            fitted[b] = dataclasses.replace(fitted[b], qnorm=[s, float(ai.mean() - deq.mean() * s)])
    return fitted


def fit_nuq(
    model: Any,
    arch: ArchInfo,
    token_ids: torch.Tensor,
    cfg: NUQCalibration,
    progress: Callable[[int], None] | None = None,
    special_prefix: Sequence[int] = (),
) -> dict[int, KVTransform]:
    """Fit thresholds and lookup tables on calibration sequences of the text tokens ``token_ids``, each starting
    with ``special_prefix`` (see :func:`~kvtool.calibrators.fisher.calibration_windows`); return one per-layer
    transform per bit width in ``cfg.bits``."""
    acc = NuqAccumulator(arch, cfg)
    accumulate(model, token_ids, cfg.seq_len, cfg.num_seqs, cfg.seed, acc.add, progress, special_prefix)
    return acc.fit()
