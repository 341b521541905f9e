"""Calibrated low-rank projections of keys and values, with per-component bit allocation (``--method pca|svd``).

From the Fisher passes of :mod:`kvtool.calibrators.fisher` (pre-RoPE keys, values, and the loss gradient with
respect to each), per layer and K/V, at a granularity of one basis per KV head or per layer (heads concatenated):

* ``pca``: mean and eigenbasis of the centred covariance (Loki, arXiv:2406.02542; KVTC, arXiv:2511.01815);
* ``svd``: eigenbasis of the *uncentred* second moment, no mean. For a linear projection ``k = W h`` this is exactly
  Palu's activation-aware (whitened) SVD (arXiv:2407.21118): ``K Kᵀ = W (H Hᵀ) Wᵀ = (W S)(W S)ᵀ`` with
  ``S = chol(H Hᵀ)``, so the left singular vectors ``U`` of ``W S`` are these eigenvectors, and the rank-``r``
  factorisation ``W ≈ U_r (U_rᵀ W)`` can be folded into the weights (no per-token transform at run time).

Then, in the basis, per component ``j`` and bit width ``b``: the static uniform grid (a clipping range among
``CLIP_SIGMAS`` standard deviations) that minimises the Fisher-weighted error ``Σ_t (g_t·u_j)² (ĉ_tj − c_tj)²``
(the diagonal Fisher in the rotated basis: the same second-order loss proxy as the precision search), and that error.
The table (every component × every option) is kept in the artifact, so a new budget is re-solved in seconds
(:func:`resolve_projection`) by :func:`~kvtool.calibrators.bit_allocation.allocate_bits`: a bit budget gives
per-component widths (KVTC's transform coding); a rank fraction keeps fp16 components by Fisher-weighted energy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact
from kvtool.budget import Budget
from kvtool.calibration import calibration_artifact
from kvtool.calibrators.bit_allocation import allocate_bits
from kvtool.calibrators.codec_rates import OptionTable, allocate_levels, measure_options
from kvtool.calibrators.fisher import LayerStats, accumulate
from kvtool.codecs.ecsq import Level, codec_levels, level_tensors
from kvtool.errors import ArtifactError, UsageError
from kvtool.quantizers.projection import FP16_COEFFICIENT, MAX_CODE_BITS, EntropyCodedProjection, ProjectionQuantizer
from kvtool.transforms import FP16_BITS, KVTransform

#: Options per component: dropped, 1..8-bit static grids, fp16.
OPTION_BITS = torch.tensor([0, *range(1, MAX_CODE_BITS + 1), FP16_COEFFICIENT], dtype=torch.float64)
#: Half-widths of the static grid tried per component and bit width, in standard deviations of the component.
CLIP_SIGMAS = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
KINDS = ("k", "v")


@kvconfig.register
@dataclass(frozen=True)
class ProjectionCalibration:
    """Settings of a projection calibration (recorded in the artifact). Exactly one budget is set:
    ``target_bits`` (all-in bits per element at ``seq_len``, fp16 sinks counted) or ``target_rank_fraction``
    (fraction of components kept, as fp16 coefficients, over keys and values together)."""

    version: ClassVar[int] = 1
    method: Literal["pca", "svd"] = "pca"
    granularity: Literal["head", "layer"] = "layer"
    target_bits: float | None = 2.0
    target_rank_fraction: float | None = None
    sink_tokens: int = 1
    fit_skip_recent: int = 0  #: last tokens of each calibration window left out of the fit (KVTC leaves out 128)
    num_seqs: int = 8
    seq_len: int = 2048
    seed: int = 0
    table_tokens: int = 8192  #: tokens per layer (seeded sample) on which the distortion table is measured

    def __post_init__(self) -> None:
        if self.method not in ("pca", "svd"):
            raise UsageError(f"method must be pca or svd (got '{self.method}')")
        if self.granularity not in ("head", "layer"):
            raise UsageError(f"granularity must be head or layer (got '{self.granularity}')")
        if (self.target_bits is None) == (self.target_rank_fraction is None):
            raise UsageError("give exactly one of target_bits and target_rank_fraction")
        if self.target_bits is not None and not 0 < self.target_bits <= FP16_BITS:
            raise UsageError(f"target_bits must be in (0, 16] (got {self.target_bits})")
        if self.target_rank_fraction is not None and not 0 <= self.target_rank_fraction <= 1:
            raise UsageError(f"target_rank_fraction must be in [0, 1] (got {self.target_rank_fraction})")
        if self.sink_tokens < 0 or self.fit_skip_recent < 0:
            raise UsageError("sink_tokens and the recent tokens skipped (fit_skip_recent) must be >= 0")
        if self.seq_len <= self.sink_tokens + self.fit_skip_recent or self.num_seqs < 1:
            raise UsageError("need calibration sequences longer than the sink and skipped recent tokens")

    # -- the calibrator protocol (kvtool.calibrators.base) --------------------------------------------------------

    def describe(self, arch: ArchInfo) -> str:
        return f"fitting {self.method} bases per {self.granularity} on {self.num_seqs} x {self.seq_len} tokens"

    def outputs(self) -> dict[int, str]:
        return {0: f".{self.method}.kvcal.safetensors"}

    @property
    def passes(self) -> int:
        return 1

    def fit(self, lm: Any, ids: torch.Tensor, *, special_prefix: list[int],
            progress: Callable[[int], None] | None = None) -> ProjectionTable:  # fmt: skip
        table = fit_projection(lm.model, lm.arch, ids, self, progress=progress, special_prefix=special_prefix)
        table.arch = lm.arch
        return table

    def solve(self, table: ProjectionTable, budget: Budget | None = None) -> KVTransform:
        budget = budget_of(self) if budget is None else budget
        if table.arch is None:
            raise ValueError("this table was read from an artifact: re-solve the artifact (resolve_budget)")
        if budget.level is not None:
            return entropy_coded_transform(table, budget.level, table.arch, self)
        name = f"{self.method}-{self.granularity}-{budget.label()}"
        return bits_transform(table, allocate(table, budget), table.arch, self, name)

    def artifacts(self, record: dict[str, Any], inputs: dict[str, Any], table: ProjectionTable) -> dict[int, Artifact]:
        return {0: projection_artifact(record, self, inputs, table, budget_of(self))[0]}


@dataclass
class ProjectionTable:
    """What the fit measured, per kind (``"k"``, ``"v"``); shapes ``(layers, G, d, ...)``.

    ``mean``/``basis``/``eigenvalues``: the fitted bases; ``distortion`` ``(L, G, d, len(OPTION_BITS))``: the
    Fisher-weighted error of each option; ``lo``/``step`` ``(L, G, d, 8)``: the best grid of each bit width.
    ``slot_tokens`` ``(L,)``: coded (non-sink) tokens of each layer at the calibration context, the cost weight.
    """

    mean: dict[str, torch.Tensor]
    basis: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    distortion: dict[str, torch.Tensor]
    lo: dict[str, torch.Tensor]
    step: dict[str, torch.Tensor]
    slot_tokens: torch.Tensor
    total_tokens: torch.Tensor  #: ``(L,)`` cached tokens per layer at the calibration context
    #: The codec's calibrated rate levels (:mod:`kvtool.codecs.ecsq`); components ordered K then V, layer, G, d.
    codec_levels: list[Level] = field(default_factory=list)
    #: the model's architecture when the table was fitted in this process (not stored: an artifact records it)
    arch: ArchInfo | None = field(default=None, compare=False)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"proj_slot_tokens": self.slot_tokens, "proj_total_tokens": self.total_tokens}
        out |= level_tensors(self.codec_levels)
        for k in KINDS:
            out |= {f"proj_{k}_eigenvalues": self.eigenvalues[k], f"proj_{k}_distortion": self.distortion[k]}
            out |= {f"proj_{k}_lo": self.lo[k], f"proj_{k}_step": self.step[k]}
        return out

    @classmethod
    def from_artifact(cls, tensors: dict[str, torch.Tensor], transform: KVTransform) -> ProjectionTable:
        """Rebuild from the artifact's tensors; mean and basis come from the bound transform (every layer of both
        kinds is a :class:`ProjectionQuantizer`)."""
        try:
            slots = {k: transform.keys if k == "k" else transform.values for k in KINDS}
            if not all(isinstance(t, ProjectionQuantizer) for s in slots.values() for t in s):
                raise ArtifactError("projection artifact: every layer must hold a projection for K and V")
            return cls(
                mean={k: torch.stack([t.mean for t in s]) for k, s in slots.items()},  # type: ignore[union-attr]
                basis={k: torch.stack([t.basis for t in s]) for k, s in slots.items()},  # type: ignore[union-attr]
                eigenvalues={k: tensors[f"proj_{k}_eigenvalues"] for k in KINDS},
                distortion={k: tensors[f"proj_{k}_distortion"].double() for k in KINDS},
                lo={k: tensors[f"proj_{k}_lo"] for k in KINDS},
                step={k: tensors[f"proj_{k}_step"] for k in KINDS},
                slot_tokens=tensors["proj_slot_tokens"],
                total_tokens=tensors["proj_total_tokens"],
                codec_levels=codec_levels(tensors),
            )
        except (KeyError, TypeError, RuntimeError) as e:
            raise ArtifactError(f"projection artifact: missing or malformed table ({e})") from e


# -- fitting ------------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One layer's keys or values across calibration sequences, streamed: the moments the basis needs and the
    seeded sample of tokens the distortion table is measured on (the full data is never held)."""

    picks: torch.Tensor  #: sorted indices, among all the slot's calibration tokens, of the table sample
    count: int = 0  #: tokens seen
    total: torch.Tensor | None = None  #: (G, d) float64 sum
    gram: torch.Tensor | None = None  #: (G, d, d) float64 sum of outer products
    x: list[torch.Tensor] = field(default_factory=list)  # sampled (tokens, G, d)
    g: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one sequence's ``(tokens, G, d)`` vectors and gradients."""
        xd = x.double()
        total = xd.sum(0).cpu()
        outer = (xd.transpose(0, 1).transpose(1, 2) @ xd.transpose(0, 1)).cpu()  # (G, d, d), on the data's device
        self.total = total if self.total is None else self.total + total
        self.gram = outer if self.gram is None else self.gram + outer
        lo, hi = self.count, self.count + x.shape[0]
        mine = (self.picks[(self.picks >= lo) & (self.picks < hi)] - lo).to(x.device)
        self.x.append(x[mine].clone())  # the table sample stays on the data's device, where it is measured
        self.g.append(g[mine].clone())
        self.count = hi


def _blocks(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """``(1, heads, tokens, head_dim)`` → ``(tokens, G, d)``."""
    x = t[0].permute(1, 0, 2)  # (tokens, heads, head_dim)
    return x if granularity == "head" else x.reshape(x.shape[0], 1, -1)


def _eigenbasis(slot: _Slot, centred: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(G, d)``, basis ``(G, d, d)`` and eigenvalues ``(G, d)`` (descending) of a slot's vectors, from its
    streamed moments (float64: ``E[x xᵀ] - μ μᵀ``).

    Signs are fixed (largest-magnitude entry of each vector positive) so the basis is deterministic."""
    assert slot.total is not None and slot.gram is not None
    mean = slot.total / slot.count if centred else torch.zeros_like(slot.total)
    cov = slot.gram / slot.count - mean[:, :, None] * mean[:, None, :]
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    pivot = evecs.abs().argmax(dim=1, keepdim=True)
    evecs = evecs * torch.sign(evecs.gather(1, pivot))
    return mean.float(), evecs.float(), evals.float()


def _grid_table(c: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per component (``c``, ``w``: ``(T, N)``), the best grid of each bit width and every option's error.

    Returns ``distortion (N, len(OPTION_BITS))``, ``lo (N, 8)``, ``step (N, 8)``; float64 errors summed over
    tokens; computed on the coefficients' device, returned on the host."""
    n, dev = c.shape[1], c.device
    dist = torch.zeros(n, len(OPTION_BITS), dtype=torch.float64, device=dev)
    los = torch.zeros(n, MAX_CODE_BITS, device=dev)
    steps = torch.zeros(n, MAX_CODE_BITS, device=dev)
    dist[:, 0] = (w * c.square()).sum(0, dtype=torch.float64)
    c16 = c.half().float()
    dist[:, -1] = (w * (c16 - c).square()).sum(0, dtype=torch.float64)
    sig = sigma.clamp_min(1e-12)
    for b in range(1, MAX_CODE_BITS + 1):
        levels = float(2**b)
        best = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
        for k in CLIP_SIGMAS:
            lo = -k * sig
            step = (2 * k * sig / levels).half().float().clamp_min(1e-30)  # stored as fp16
            lo = lo.half().float()
            s = torch.floor((c - lo) / step).clamp(0, levels - 1)
            err = (w * (lo + (s + 0.5) * step - c).square()).sum(0, dtype=torch.float64)
            better = err < best
            best = torch.where(better, err, best)
            los[:, b - 1] = torch.where(better, lo, los[:, b - 1])
            steps[:, b - 1] = torch.where(better, step, steps[:, b - 1])
        dist[:, b] = best
    return dist.cpu(), los.cpu(), steps.cpu()


class ProjectionAccumulator:
    """Collects, per layer and K/V, the calibration vectors and their gradients (sinks and skipped recent tokens
    excluded), then fits the bases and the distortion table."""

    def __init__(self, arch: ArchInfo, cfg: ProjectionCalibration):
        self.arch, self.cfg = arch, cfg
        self.slots: dict[str, list[_Slot]] = {}

    def _span(self, n: int) -> tuple[int, int]:
        """(start, stop) of the tokens of one calibration sequence a layer holding ``n`` of them fits on: sinks and
        skipped recent tokens excluded (sliding layers may hold the most recent tokens only)."""
        cfg = self.cfg
        start = max(0, cfg.sink_tokens - (cfg.seq_len - n))
        return start, n - min(cfg.fit_skip_recent, n - start)

    def add(self, stats: list[LayerStats]) -> None:
        cfg = self.cfg
        spans = [self._span(st.keys.shape[-2]) for st in stats]
        if not self.slots:
            # The table sample: ``table_tokens`` seeded picks among each slot's calibration tokens (all sequences
            # together), drawn before the first sequence so the picked tokens are kept as they stream by.
            gen = torch.Generator().manual_seed(cfg.seed)
            self.slots = {k: [_Slot(torch.randperm(cfg.num_seqs * (stop - start), generator=gen)[: cfg.table_tokens]
                                    .sort().values) for start, stop in spans] for k in KINDS}  # fmt: skip
        for i, (st, (start, stop)) in enumerate(zip(stats, spans, strict=True)):
            for k, x, g in (("k", st.keys, st.key_grad), ("v", st.values, st.value_grad)):
                self.slots[k][i].add(_blocks(x[..., start:stop, :], cfg.granularity),
                                     _blocks(g[..., start:stop, :], cfg.granularity))  # fmt: skip

    def fit(self) -> ProjectionTable:
        cfg, arch = self.cfg, self.arch
        parts: dict[str, dict[str, list[torch.Tensor]]] = {k: {} for k in KINDS}
        options: list[OptionTable] = []
        for k in KINDS:
            for slot in self.slots[k]:
                x, g = torch.cat(slot.x), torch.cat(slot.g)
                slot.x, slot.g = [], []
                mean, basis, evals = _eigenbasis(slot, centred=cfg.method == "pca")
                on = x.device
                c = ((x - mean.to(on))[:, :, None, :] @ basis.to(on)[None]).squeeze(2)  # (T, G, d)
                gc = (g[:, :, None, :] @ basis.to(on)[None]).squeeze(2)
                big, d = c.shape[1], c.shape[2]
                # The table is measured on a sample; scale it to the whole calibration set.
                scale = slot.count / x.shape[0]
                dist, lo, step = _grid_table(c.reshape(-1, big * d), gc.square().reshape(-1, big * d),
                                             evals.reshape(-1).sqrt().to(on))  # fmt: skip
                opt = measure_options(
                    c.reshape(-1, big * d), gc.square().reshape(-1, big * d), evals.reshape(-1).sqrt().to(on)
                )
                opt.dist *= scale
                options.append(opt)
                for name, t in (("mean", mean), ("basis", basis), ("eigenvalues", evals),
                                ("distortion", (dist * scale).reshape(big, d, -1)),
                                ("lo", lo.reshape(big, d, -1)), ("step", step.reshape(big, d, -1))):  # fmt: skip
                    parts[k].setdefault(name, []).append(t)
        total = torch.tensor([arch.cached_tokens(i, cfg.seq_len) for i in range(arch.num_layers)], dtype=torch.float64)
        sinks = torch.tensor(
            [min(max(cfg.sink_tokens - (cfg.seq_len - int(n)), 0), int(n)) for n in total], dtype=torch.float64
        )
        stacked = {k: {name: torch.stack(ts) for name, ts in parts[k].items()} for k in KINDS}
        per_slot = options[0].rate.shape[0]
        weight = torch.cat([(total - sinks).repeat_interleave(per_slot)] * len(KINDS))
        merged = OptionTable(*(torch.cat([getattr(o, f) for o in options]) for f in
                               ("rate", "dist", "counts", "kmax", "step")))  # fmt: skip
        elements = float(total.sum()) * per_slot * len(KINDS)
        fixed = float(sinks.sum()) * per_slot * len(KINDS) * FP16_BITS
        levels = allocate_levels(merged, weight, elements, fixed, 1.0)
        return ProjectionTable(
            **{
                name: {k: stacked[k][name] for k in KINDS}
                for name in ("mean", "basis", "eigenvalues", "distortion", "lo", "step")
            },  # fmt: skip
            slot_tokens=total - sinks,
            total_tokens=total,
            codec_levels=levels,
        )


# -- allocation -----------------------------------------------------------------------------------------------------


def budget_of(cfg: ProjectionCalibration) -> Budget:
    """The budget a projection calibration asks for (its ``target_bits`` or ``target_rank_fraction``)."""
    if cfg.target_rank_fraction is not None:
        return Budget(rank_fraction=cfg.target_rank_fraction)
    return Budget(bits=cfg.target_bits)


def allocate(table: ProjectionTable, budget: Budget) -> dict[str, torch.Tensor]:
    """Bits per component ``{k, v: (L, G, d)}`` (values in ``OPTION_BITS``) for ``budget``."""
    shapes = {k: table.distortion[k].shape[:-1] for k in KINDS}
    per_slot = {k: int(math.prod(shapes[k][1:])) for k in KINDS}
    dist = torch.cat([table.distortion[k].reshape(-1, len(OPTION_BITS)) for k in KINDS])
    weight = torch.cat([table.slot_tokens.double().repeat_interleave(per_slot[k]) for k in KINDS])
    if budget.bits is not None:
        elements = sum(float(table.total_tokens.sum()) * per_slot[k] for k in KINDS)
        fixed = sum(float((table.total_tokens - table.slot_tokens).sum()) * per_slot[k] * FP16_BITS for k in KINDS)
        options = OPTION_BITS
        picked = allocate_bits(dist, options, weight, budget.bits * elements - fixed)
        chosen = options[picked]
    else:
        options = torch.tensor([0.0, FP16_COEFFICIENT], dtype=torch.float64)
        on = torch.cat([torch.full((table.distortion[k][..., 0].numel(),), k in budget.kinds) for k in KINDS])
        two = torch.stack([dist[:, 0], dist[:, -1]], dim=1)
        two[~on, 0] = float("inf")  # kinds outside the budget keep every component
        cost_all = float((weight[on] * FP16_COEFFICIENT).sum())
        room = budget.rank_fraction * cost_all + float((weight[~on] * FP16_COEFFICIENT).sum())  # type: ignore[operator]
        chosen = options[allocate_bits(two, options, weight, room)]
    out, at = {}, 0
    for k in KINDS:
        n = table.distortion[k][..., 0].numel()
        out[k] = chosen[at : at + n].reshape(shapes[k]).float()
        at += n
    return out


def bits_transform(
    table: ProjectionTable, bits: dict[str, torch.Tensor], arch: ArchInfo, cfg: ProjectionCalibration, name: str
) -> KVTransform:
    """The per-layer :class:`KVTransform` of an allocation."""
    slots: dict[str, list[ProjectionQuantizer]] = {}
    for k in KINDS:
        b = bits[k]
        idx = (b.clamp(1, MAX_CODE_BITS) - 1).long()[..., None]
        coded = (b >= 1) & (b <= MAX_CODE_BITS)
        lo = torch.where(coded, table.lo[k].gather(-1, idx)[..., 0], torch.zeros_like(b))
        step = torch.where(coded, table.step[k].gather(-1, idx)[..., 0], torch.zeros_like(b))
        slots[k] = [
            ProjectionQuantizer(
                arch.num_kv_heads,
                arch.head_dim,
                cfg.granularity,
                mean=table.mean[k][i],
                basis=table.basis[k][i],
                bits=b[i],
                lo=lo[i],
                step=step[i],
            )  # fmt: skip
            for i in range(arch.num_layers)
        ]
    return KVTransform(slots["k"], slots["v"], keys_pre_rope=True, sink_tokens=cfg.sink_tokens, name=name)


def spectrum(table: ProjectionTable, bits: dict[str, torch.Tensor]) -> dict[str, list[dict[str, Any]]]:
    """Per layer and K/V: kept rank (components with bits > 0), mean code bits, fraction of the variance and of the
    Fisher-weighted energy kept, and the ranks that hold 50 / 90 / 99 % of the variance (per block, summed)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for k in KINDS:
        rows = []
        for i in range(bits[k].shape[0]):
            ev = table.eigenvalues[k][i].double()  # (G, d)
            fe = table.distortion[k][i][..., 0]
            kept = bits[k][i] > 0
            share = ev.cumsum(-1) / ev.sum(-1, keepdim=True).clamp_min(1e-30)
            rows.append(
                {
                    "rank": int(kept.sum()),
                    "dims": int(kept.numel()),
                    "mean_bits": float(bits[k][i].mean()),
                    "energy_kept": float(ev[kept].sum() / ev.sum().clamp_min(1e-30)),
                    "fisher_energy_kept": float(fe[kept].sum() / fe.sum().clamp_min(1e-30)),
                    **{
                        f"rank{p}": int(((share < p / 100).sum(-1) + 1).clamp_max(ev.shape[-1]).sum())
                        for p in (50, 90, 99)
                    },  # fmt: skip
                }
            )
        out[k] = rows
    return out


def projection_artifact(
    model: dict[str, Any], cfg: ProjectionCalibration, inputs: dict[str, Any], table: ProjectionTable, budget: Budget
) -> tuple[Artifact, KVTransform]:
    """Allocate ``budget`` on ``table`` and assemble the calibration artifact (the table rides along)."""
    arch = ArchInfo.from_dict(model["arch"])
    bits = allocate(table, budget)
    transform = bits_transform(table, bits, arch, cfg, f"{cfg.method}-{cfg.granularity}-{budget.label()}")
    levels = [{"bits": lv.bits, "expected_bits": lv.expected_bits} for lv in table.codec_levels]
    # the record names the four fields a projection budget uses (its bits are all-in by definition)
    record = {"bits": budget.bits, "rank_fraction": budget.rank_fraction, "kinds": budget.kinds, "level": budget.level}
    extra = {"projection": {"budget": record, "spectrum": spectrum(table, bits),
                            "codec_levels": levels}}  # fmt: skip
    art = calibration_artifact(model, cfg, inputs, transform, extra, table.to_tensors(), cfg.seq_len)
    return art, transform


def resolve_projection(old: Artifact, budget: Budget) -> tuple[Artifact, KVTransform]:
    """Re-allocate a projection artifact's measured table for a new budget (no model needed)."""
    from kvtool.calibration import transform_of

    cfg = kvconfig.from_dict(old.method)
    if not isinstance(cfg, ProjectionCalibration):
        raise ArtifactError(f"made by {type(cfg).__name__}, not a projection calibration")
    table = ProjectionTable.from_artifact(old.tensors, transform_of(old))
    if budget.level is not None:
        return old, entropy_coded_transform(table, budget.level, ArchInfo.from_dict(old.model["arch"]), cfg)
    if budget.accounting == "nominal":
        raise UsageError("a projection's bit budget is all-in (its tables, means and fp16 tokens are counted)")
    cfg = dataclasses.replace(cfg, target_bits=budget.bits, target_rank_fraction=budget.rank_fraction)
    return projection_artifact(old.model, cfg, old.inputs, table, budget)


def entropy_coded_transform(
    table: ProjectionTable, level: int, arch: ArchInfo, cfg: ProjectionCalibration
) -> KVTransform:
    """The in-attention simulation of codec level ``level``: per layer an :class:`EntropyCodedProjection` with that
    level's grids; its bits are the calibrated entropy-coded rate (what the ``.kvz`` file measures for real)."""
    if not -len(table.codec_levels) <= level < len(table.codec_levels):
        raise UsageError(f"level {level} out of range: the artifact has {len(table.codec_levels)} codec levels")
    lv = table.codec_levels[level]
    if lv.rate is None:
        raise ArtifactError("this artifact's codec levels have no per-component rates (re-run the calibration)")
    g, d = table.mean["k"].shape[1:]
    per_kind = arch.num_layers * g * d
    slots: dict[str, list[EntropyCodedProjection]] = {}
    for j, k in enumerate(KINDS):
        part = slice(j * per_kind, (j + 1) * per_kind)
        step, kmax, rate = (t[part].reshape(arch.num_layers, g, d).float() for t in (lv.step, lv.kmax, lv.rate))
        slots[k] = [
            EntropyCodedProjection(
                arch.num_kv_heads,
                arch.head_dim,
                cfg.granularity,
                mean=table.mean[k][i],
                basis=table.basis[k][i],
                step=step[i],
                kmax=kmax[i],
                rate=rate[i],
            )  # fmt: skip
            for i in range(arch.num_layers)
        ]
    name = f"{cfg.method}-{cfg.granularity}-L{level}"
    return KVTransform(slots["k"], slots["v"], keys_pre_rope=True, sink_tokens=cfg.sink_tokens, name=name)


def fit_projection(
    model: Any,
    arch: ArchInfo,
    token_ids: torch.Tensor,
    cfg: ProjectionCalibration,
    progress: Callable[[int], None] | None = None,
    special_prefix: Sequence[int] = (),
) -> ProjectionTable:
    """Run the Fisher passes on calibration sequences of the text tokens ``token_ids``, each starting with
    ``special_prefix`` (see :func:`~kvtool.calibrators.fisher.calibration_windows`), and fit bases and distortion
    table."""
    acc = ProjectionAccumulator(arch, cfg)
    accumulate(model, token_ids, cfg.seq_len, cfg.num_seqs, cfg.seed, acc.add, progress, special_prefix)
    return acc.fit()
