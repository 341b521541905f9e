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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact
from kvtool.budget import Budget
from kvtool.calibrators.fisher import FisherPasses, LayerStats, calibration_windows
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

    @property
    def passes(self) -> int:
        return NuqAccumulator.passes

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


def bin_centres(bins: int) -> torch.Tensor:
    """The centres of ``bins`` equal bins over ``[-1, 1]`` (float64)."""
    return (torch.arange(bins, dtype=torch.float64) + 0.5) * (2 / bins) - 1


def _bin_index(a: torch.Tensor, bins: int) -> torch.Tensor:
    """The bin of each inlier ``a`` in ``[-1, 1]``."""
    return ((a.clamp(-1, 1) + 1) * (bins / 2)).long().clamp_(0, bins - 1)


def _bin_sums(idx: torch.Tensor, w: torch.Tensor, bins: int) -> torch.Tensor:
    """Per bin the summed weights ``w`` of the elements in bins ``idx`` (float64, on the host)."""
    return torch.zeros(bins, dtype=torch.float64, device=idx.device).index_add_(0, idx, w.double()).cpu()


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


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """``(1, heads, tokens, head_dim)`` → ``(tokens, heads, head_dim)``."""
    return x[0].permute(1, 0, 2).contiguous()


def tail_quantile(tail: torch.Tensor, count: int, q: float, upper: bool = False) -> torch.Tensor:
    """``torch.quantile(data, q, dim=0)`` (linear interpolation, positions in float32 as torch computes them) of
    the ``count`` rows of ``data`` from its extreme rows only: ``tail`` ``(k, columns)``, the ``k`` smallest values
    ascending (or, with ``upper``, the ``k`` largest descending), ``k`` at least :func:`tail_length`."""
    pos = torch.tensor(q, dtype=torch.float32) * (count - 1)
    below = int(pos.floor())
    frac = pos - pos.floor()
    at = (lambda r: tail[count - 1 - r]) if upper else (lambda r: tail[r])  # noqa: E731 - rank -> row
    lo, hi = at(below), at(min(below + 1, count - 1))
    return torch.lerp(lo, hi, frac.to(lo.device).expand_as(lo))


def tail_length(count: int, q: float) -> int:
    """How many extreme values :func:`tail_quantile` needs for quantile ``q`` (or ``1 - q``) of ``count``."""
    return min(math.floor(min(q, 1 - q) * (count - 1)) + 2, count)


@dataclass
class _Histogram:
    """A streamed weighted histogram of normalised inliers in ``[-1, 1]`` (``bins`` bins), with the plain counts
    and the exact first two moments of the inliers (for Q-Norm)."""

    bins: int
    weighted: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    moments: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # n, Σa, Σa²

    def add(self, a: torch.Tensor, w: torch.Tensor) -> None:
        inlier = a.abs() <= 1
        ai = a[inlier]
        idx = _bin_index(ai, self.bins)
        hist = _bin_sums(idx, w[inlier], self.bins)
        counts = _bin_sums(idx, torch.ones_like(ai), self.bins)
        self.weighted = hist if self.weighted is None else self.weighted + hist
        self.counts = counts if self.counts is None else self.counts + counts
        ad = ai.double()
        self.moments = [self.moments[0] + ai.numel(), self.moments[1] + float(ad.sum()),
                        self.moments[2] + float(ad.square().sum())]  # fmt: skip


@dataclass
class _LayerAccumulator:
    """What one layer's fit keeps across calibration sequences: the key tails per channel (exact percentile
    thresholds), and the histograms of normalised values (first pass) and keys (second pass)."""

    count: int = 0  #: key tokens seen (sinks excluded)
    smallest: torch.Tensor | None = None  #: (k, heads * head_dim) the smallest keys so far, ascending
    largest: torch.Tensor | None = None  #: (k, heads * head_dim) the largest keys so far, descending
    key_hist: _Histogram | None = None
    value_hist: _Histogram | None = None


def _keep_extremes(kept: torch.Tensor | None, new: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Per column the ``k`` smallest (ascending) or largest (descending) values of ``kept`` and ``new`` rows."""
    both = new if kept is None else torch.cat([kept, new])
    return both.topk(min(k, both.shape[0]), dim=0, largest=largest, sorted=True).values


class NuqAccumulator:
    """The fit's statistics from the Fisher passes, streamed (sinks excluded): two passes over the calibration
    sequences, because keys are normalised by thresholds that only the whole first pass determines.

    Pass 0 keeps, per layer and (KV head, channel), only the smallest and largest ``outlier_frac / 2`` of the
    pre-RoPE keys (the exact percentile thresholds, as ``torch.quantile`` over all tokens would give), and the
    histogram of the per-token-normalised values; pass 1 the histogram of the threshold-normalised keys. Memory is
    a few tails and histograms per layer, whatever the number of calibration tokens.
    """

    passes = 2

    def __init__(self, arch: ArchInfo, cfg: NUQCalibration):
        self.arch, self.cfg = arch, cfg
        self.layers = [_LayerAccumulator() for _ in range(arch.num_layers)]
        self.thresholds: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._shape = {"heads": arch.num_kv_heads, "head_dim": arch.head_dim, "outlier_frac": cfg.outlier_frac}

    def _weights(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return g.square() if self.cfg.weighting == "fisher" else torch.ones_like(a)

    def add(self, stats: list[LayerStats], pass_index: int = 0) -> None:
        """Add one calibration sequence's statistics to pass ``pass_index`` (all of pass 0 before any of pass 1)."""
        cfg = self.cfg
        if pass_index == 1 and not self.thresholds:
            self.thresholds = [self._thresholds(acc) for acc in self.layers]
        for i, st in enumerate(stats):
            n = st.keys.shape[-2]
            sinks = max(0, cfg.sink_tokens - (cfg.seq_len - n))  # sliding layers hold recent tokens only
            acc = self.layers[i]
            keys, kg = st.keys[..., sinks:, :], st.key_grad[..., sinks:, :]
            if pass_index == 0:
                total = cfg.num_seqs * (n - sinks)
                flat = _tokens_major(keys).reshape(keys.shape[-2], -1).float()
                k = tail_length(total, cfg.outlier_frac / 2)
                acc.smallest = _keep_extremes(acc.smallest, flat, k, largest=False)
                acc.largest = _keep_extremes(acc.largest, flat, k, largest=True)
                acc.count += flat.shape[0]
                values, vg = st.values[..., sinks:, :], st.value_grad[..., sinks:, :]
                a, _, _ = NonUniformQuantizer(1, "token", **self._shape).normalize(values.float())
                acc.value_hist = acc.value_hist or _Histogram(cfg.bins)
                acc.value_hist.add(_tokens_major(a).reshape(-1), _tokens_major(self._weights(vg, a)).reshape(-1))
            else:
                lo, hi = self.thresholds[i]
                base = NonUniformQuantizer(1, "channel", thr_lo=lo, thr_hi=hi, **self._shape)
                a, _, _ = base.normalize(keys.float())
                acc.key_hist = acc.key_hist or _Histogram(cfg.bins)
                acc.key_hist.add(_tokens_major(a).reshape(-1), _tokens_major(self._weights(kg, a)).reshape(-1))

    def _thresholds(self, acc: _LayerAccumulator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (KV head, channel) ``outlier_frac / 2`` and ``1 - outlier_frac / 2`` percentiles of the keys."""
        assert acc.smallest is not None and acc.largest is not None
        q = self.cfg.outlier_frac / 2
        shape = (self.arch.num_kv_heads, self.arch.head_dim)
        lo = tail_quantile(acc.smallest, acc.count, q) if q else acc.smallest[0]
        hi = tail_quantile(acc.largest, acc.count, 1 - q, upper=True) if q else acc.largest[0]
        return lo.reshape(shape).cpu(), hi.reshape(shape).cpu()

    def fit(self) -> dict[int, KVTransform]:
        """One per-layer transform per bit width (thresholds, Fisher-weighted LUTs, optional Q-Norm)."""
        cfg = self.cfg
        out: dict[int, tuple[list[NonUniformQuantizer], list[NonUniformQuantizer]]] = {b: ([], []) for b in cfg.bits}
        for acc, (lo, hi) in zip(self.layers, self.thresholds, strict=True):
            assert acc.key_hist is not None and acc.value_hist is not None, "fit() needs both passes"
            for slot, hist, base in (
                (0, acc.key_hist, NonUniformQuantizer(1, "channel", thr_lo=lo, thr_hi=hi, **self._shape)),
                (1, acc.value_hist, NonUniformQuantizer(1, "token", **self._shape)),
            ):
                for b, fitted in _fit_tables(base, hist, cfg).items():
                    out[b][slot].append(fitted)
        return {
            b: KVTransform(ks, vs, keys_pre_rope=True, sink_tokens=cfg.sink_tokens, name=f"nuq{b}")
            for b, (ks, vs) in out.items()
        }


def _fit_tables(base: NonUniformQuantizer, hist: _Histogram, cfg: NUQCalibration) -> dict[int, NonUniformQuantizer]:
    """LUTs of every bit width for one slot: weighted k-means on the histogram of the normalised inliers. Q-Norm
    restores the inliers' exact mean and standard deviation, the dequantized ones taken from the count histogram
    (each bin at its centre's level)."""
    assert hist.weighted is not None and hist.counts is not None
    centres = bin_centres(cfg.bins)
    fitted = {}
    for b in cfg.bits:
        lut = weighted_kmeans_1d(centres, hist.weighted, 1 << b, cfg.kmeans_iters)
        fitted[b] = dataclasses.replace(base, bits=b, lut=lut)
        if cfg.qnorm:
            n, s1, s2 = hist.moments
            mean = s1 / max(n, 1)
            std = math.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0) * n / max(n - 1, 1))
            deq = lut.double()[fitted[b].codes(centres.float())]
            c = hist.counts
            dmean = float((c * deq).sum() / c.sum().clamp_min(1))
            dstd = math.sqrt(max(float((c * (deq - dmean).square()).sum() / (c.sum() - 1).clamp_min(1)), 0.0))
            scale = std / max(dstd, 1e-12)
            fitted[b] = dataclasses.replace(fitted[b], qnorm=[scale, mean - dmean * scale])
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
    windows = calibration_windows(token_ids, cfg.seq_len, cfg.num_seqs, cfg.seed, special_prefix)
    with FisherPasses(model, windows) as passes:
        for p in range(acc.passes):
            for stats in passes:
                acc.add(stats, p)
                if progress:
                    progress(1)
    return acc.fit()
