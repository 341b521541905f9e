"""Layer-wise K/V precision search under a bit budget (KVTuner, arXiv:2502.04420, done properly).

KVTuner searches per-layer (key bits, value bits) with 1000 NSGA-II trials of GSM8K, counts bits without scales
and zero points, and keeps the quantization mode only in a file name. Here:

1. **Candidates** per layer and per K / V: every bit width in ``bits`` × every layout (per-channel pre-RoPE keys
   in groups of 32/64/128/256 tokens, per-token keys and values, ...), plus fp16. Sink and recent-window tokens are
   global settings, kept in fp16 and counted.
2. **Sensitivity proxy**, additive over slots (a layer's keys or values): the Fisher-weighted squared error
   ``Σ g² (x̂ - x)²`` of the candidate on calibration text, where ``g`` is the gradient of the next-token loss
   with respect to that slot's pre-RoPE keys or values (:mod:`kvtool.calibrators.fisher`). One forward and backward
   pass per calibration sequence measures every candidate of every layer.
3. **Pareto pruning** per slot on (bits, proxy) and an **exact** multiple-choice knapsack
   (:mod:`kvtool.calibrators.solver`) under the budget, in all-in bits by default (codes, fp16 scales and zero
   points, fp16 sink and recent tokens, at ``seq_len`` tokens of context) or nominal bits (KVTuner's convention).
4. The artifact keeps the whole measured candidate table, so a new budget is re-solved without the model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact
from kvtool.budget import Budget
from kvtool.calibration import calibration_artifact
from kvtool.calibrators.fisher import FisherPasses, LayerStats, calibration_windows
from kvtool.calibrators.nuq import NuqAccumulator, NUQCalibration
from kvtool.calibrators.solver import pareto_mask, solve_budget
from kvtool.errors import ArtifactError, UsageError
from kvtool.quantizers import FloatCast, NonUniformQuantizer, UniformQuantizer
from kvtool.transforms import KVTransform, TensorTransform

ACCOUNTINGS = ("all-in", "nominal")
_LAYOUT = re.compile(r"^(token|channel)(?:-g(\d+))?(-had)?$")


def layout_quantizer(layout: str, bits: int) -> UniformQuantizer:
    """``channel-g32`` → per-channel groups of 32 tokens; ``token`` / ``token-g32`` → per-token groups;
    ``-had`` → per-token groups after a Hadamard rotation of the head dimension."""
    m = _LAYOUT.match(layout)
    if not m or (m[3] and m[1] != "token"):
        raise UsageError(f"unknown layout '{layout}' (expected token[-g<N>][-had], channel-g<N>)")
    group = int(m[2]) if m[2] else None
    if m[1] == "channel" and group is None:
        group = 32
    return UniformQuantizer(bits, m[1], group, rotate=bool(m[3]))


@kvconfig.register
@dataclass(frozen=True)
class PrecisionSearch:
    """Settings of the precision search (the method object is its config; every field is recorded)."""

    version: ClassVar[int] = 1
    target_bits: float = 3.25
    accounting: Literal["all-in", "nominal"] = "all-in"
    bits: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 8])
    key_layouts: list[str] = field(
        default_factory=lambda: ["channel-g32", "channel-g64", "channel-g128", "channel-g256", "token"]
    )
    value_layouts: list[str] = field(default_factory=lambda: ["token", "token-g32", "token-had", "token-g32-had"])
    nuq_bits: list[int] = field(default_factory=lambda: [2, 3, 4])
    outlier_frac: float = 0.01
    sink_tokens: int = 1
    recent_tokens: int = 0
    num_seqs: int = 8
    seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.accounting not in ACCOUNTINGS:
            raise UsageError(f"accounting must be one of {', '.join(ACCOUNTINGS)} (got '{self.accounting}')")
        if not 0 < self.target_bits <= 16:
            raise UsageError(f"target_bits must be in (0, 16] (got {self.target_bits})")
        for layout in [*self.key_layouts, *self.value_layouts]:
            for b in self.bits:
                layout_quantizer(layout, b)  # validates layout and bits
        if any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.nuq_bits):
            raise UsageError(f"non-uniform candidate bits must be integers in 1..8 (got {self.nuq_bits})")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise UsageError(f"outlier_frac must be in [0, 0.5) (got {self.outlier_frac})")
        if self.num_seqs < 1 or self.seq_len < 16:
            raise UsageError("need at least one calibration sequence of at least 16 tokens")
        if self.sink_tokens < 0 or self.recent_tokens < 0 or self.sink_tokens + self.recent_tokens >= self.seq_len:
            raise UsageError("sink_tokens and recent_tokens must be >= 0 and leave tokens to quantize")

    def candidates(self, kind: str, arch: ArchInfo | None = None) -> list[TensorTransform]:
        """Candidates of a key (``kind="k"``) or value slot: fp16 first, then every layout × bits, then the
        calibrated non-uniform datatypes (templates: their tables are fitted per layer; needs ``arch``)."""
        layouts = self.key_layouts if kind == "k" else self.value_layouts
        out = [FloatCast("float16"), *[layout_quantizer(lay, b) for lay in layouts for b in sorted(self.bits)]]
        if arch is not None:
            axis = "channel" if kind == "k" else "token"
            out += [
                NonUniformQuantizer(b, axis, arch.num_kv_heads, arch.head_dim, self.outlier_frac)
                for b in sorted(self.nuq_bits)
            ]
        return out

    def nuq(self) -> NUQCalibration:
        """The non-uniform calibration that provides the ``nuq`` candidates (same data and sinks)."""
        return NUQCalibration(
            bits=sorted(self.nuq_bits), outlier_frac=self.outlier_frac, sink_tokens=self.sink_tokens,
            num_seqs=self.num_seqs, seq_len=self.seq_len, seed=self.seed,
        )  # fmt: skip

    # -- the calibrator protocol (kvtool.calibrators.base) --------------------------------------------------------

    def describe(self, arch: ArchInfo) -> str:
        count = sum(len(self.candidates(kind, arch)) for kind in ("k", "v"))
        return f"measuring {count} candidates per layer on {self.num_seqs} x {self.seq_len} tokens"

    def outputs(self) -> dict[int, str]:
        return {0: ".kvcal.safetensors"}

    @property
    def passes(self) -> int:
        return search_passes(self)

    def fit(self, lm: Any, ids: torch.Tensor, *, special_prefix: list[int],
            progress: Callable[[int], None] | None = None) -> CandidateTable:  # fmt: skip
        return measure_candidates(lm.model, lm.arch, ids, self, progress=progress, special_prefix=special_prefix)

    def solve(self, table: CandidateTable, budget: Budget | None = None) -> KVTransform:
        if budget is not None and budget.bits is None:
            raise UsageError(f"budget '{budget.label()}': a precision search is solved for bits")
        bits = self.target_bits if budget is None else budget.bits
        accounting = self.accounting if budget is None or budget.accounting is None else budget.accounting
        return choice_transform(self, table, solve(table, bits, accounting))  # type: ignore[arg-type]

    def artifacts(self, record: dict[str, Any], inputs: dict[str, Any], table: CandidateTable) -> dict[int, Artifact]:
        choice = solve(table, self.target_bits, self.accounting)
        transform = choice_transform(self, table, choice)
        return {0: calibration_artifact(record, self, inputs, transform, search_extra(table, choice),
                                        table_tensors(table, choice), self.seq_len)}  # fmt: skip

    def shell(self, num_layers: int) -> KVTransform:
        """An empty per-layer transform carrying the shared settings (keys pre-RoPE, sinks, recent window)."""
        return KVTransform.uniform(
            num_layers, None, None, sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens, keys_pre_rope=True
        )


@dataclass
class CandidateTable:
    """What calibration measured: candidates, their proxy error per layer, and their bits per layer.

    ``error[kind]``: ``(layers, candidates)`` float64; ``bits[kind][accounting]``: ``(layers, candidates)``;
    ``weights``: ``(layers,)`` elements per slot (sliding layers hold fewer tokens).
    """

    candidates: dict[str, list[TensorTransform]]
    error: dict[str, np.ndarray]
    bits: dict[str, dict[str, np.ndarray]]
    weights: np.ndarray
    nuq: dict[int, KVTransform] = field(default_factory=dict)  #: fitted tables per bit width, per layer

    def candidate(self, kind: str, layer: int, j: int) -> TensorTransform:
        """Candidate ``j`` of a slot, with its per-layer tables bound (non-uniform datatypes)."""
        c = self.candidates[kind][j]
        if isinstance(c, NonUniformQuantizer):
            fitted = self.nuq[c.bits]
            return (fitted.keys if kind == "k" else fitted.values)[layer]
        return c

    def pareto(self, kind: str, accounting: str) -> np.ndarray:
        """Bool ``(layers, candidates)``: Pareto-optimal candidates of each slot."""
        return np.stack(
            [pareto_mask(self.bits[kind][accounting][i], self.error[kind][i]) for i in range(len(self.weights))]
        )


def candidate_bits(search: PrecisionSearch, arch: ArchInfo, kind: str) -> dict[str, np.ndarray]:
    """Nominal and all-in bits of every candidate in every layer at ``seq_len`` tokens of context."""
    shell = search.shell(arch.num_layers)
    cands = search.candidates(kind, arch)
    out = {a: np.zeros((arch.num_layers, len(cands))) for a in ACCOUNTINGS}
    for i in range(arch.num_layers):
        n = arch.cached_tokens(i, search.seq_len)
        for j, c in enumerate(cands):
            cost = shell.slot_cost(c, arch.head_dim, n, search.seq_len - n)
            out["all-in"][i, j], out["nominal"][i, j] = cost.all_in, cost.nominal
    return out


@torch.no_grad()
def _slot_errors(cands: list[TensorTransform], x: torch.Tensor, g2: torch.Tensor) -> np.ndarray:
    return np.array([float((g2 * (c.apply(x) - x).square()).sum()) for c in cands])


def measure_candidates(
    model: Any,
    arch: ArchInfo,
    token_ids: torch.Tensor,
    search: PrecisionSearch,
    progress: Callable[[int], None] | None = None,
    special_prefix: Sequence[int] = (),
) -> CandidateTable:
    """Run the Fisher passes on calibration windows of the text tokens ``token_ids``, each starting with
    ``special_prefix`` (see :func:`~kvtool.calibrators.fisher.calibration_windows`), and fill the
    :class:`CandidateTable`.

    Statistics stream (one sequence at a time). With non-uniform candidates the data is read three times
    (:class:`~kvtool.calibrators.fisher.FisherPasses`: computed once and re-read from a spill on a CPU): their
    tables are fitted first (:class:`~kvtool.calibrators.nuq.NuqAccumulator`, two passes, during the first of which
    every other candidate is measured), then a last pass measures the fitted non-uniform candidates.
    """
    windows = calibration_windows(token_ids, search.seq_len, search.num_seqs, search.seed, special_prefix)
    shell = search.shell(arch.num_layers)
    cands = {k: search.candidates(k, arch) for k in ("k", "v")}
    error = {k: np.zeros((arch.num_layers, len(cands[k]))) for k in cands}
    weights = np.array([arch.cached_tokens(i, search.seq_len) for i in range(arch.num_layers)], dtype=np.float64)
    bits = {k: candidate_bits(search, arch, k) for k in cands}
    table = CandidateTable(cands, error, bits, weights * arch.num_kv_heads * arch.head_dim)
    fitted = {k: [j for j, c in enumerate(cands[k]) if isinstance(c, NonUniformQuantizer)] for k in cands}
    plain = {k: [j for j in range(len(cands[k])) if j not in fitted[k]] for k in cands}
    acc = NuqAccumulator(arch, search.nuq()) if search.nuq_bits else None
    with FisherPasses(model, windows) as passes:
        for p in range(search_passes(search)):
            for stats in passes:
                if p == 0:
                    _add_errors(error, stats, table.candidate, shell, search, plain)
                if acc is not None and p < acc.passes:
                    acc.add(stats, p)
                elif p > 0:
                    _add_errors(error, stats, table.candidate, shell, search, fitted)
                if progress:
                    progress(1)
            if acc is not None and p == acc.passes - 1:
                table.nuq = acc.fit()
    return table


def search_passes(search: PrecisionSearch) -> int:
    """Fisher passes over the calibration sequences :func:`measure_candidates` makes."""
    return 1 + (NuqAccumulator.passes if search.nuq_bits else 0)


def _add_errors(
    error: dict[str, np.ndarray],
    stats: list[LayerStats],
    candidate: Callable[[str, int, int], TensorTransform],
    shell: KVTransform,
    search: PrecisionSearch,
    which: dict[str, list[int]],
) -> None:
    """Add one calibration sequence's Fisher-weighted errors of candidates ``which`` of every slot."""
    for i, st in enumerate(stats):
        n = st.keys.shape[-2]
        sinks, recent = shell.kept_tokens(n, search.seq_len - n)
        mid = slice(sinks, n - recent)
        for kind, x, g in (("k", st.keys, st.key_grad), ("v", st.values, st.value_grad)):
            if not which[kind]:
                continue
            layer_cands = [candidate(kind, i, j) for j in which[kind]]
            error[kind][i, which[kind]] += _slot_errors(layer_cands, x[..., mid, :], g[..., mid, :].square())


def solve(table: CandidateTable, target_bits: float, accounting: str) -> dict[str, list[int]]:
    """Choose one candidate per slot within ``target_bits`` (mean over all K and V elements)."""
    if accounting not in ACCOUNTINGS:
        raise UsageError(f"accounting must be one of {', '.join(ACCOUNTINGS)} (got '{accounting}')")
    kinds = ("k", "v")
    layers = len(table.weights)
    costs = [table.bits[k][accounting][i] for k in kinds for i in range(layers)]
    errors = [table.error[k][i] for k in kinds for i in range(layers)]
    allowed = [m for k in kinds for m in table.pareto(k, accounting)]
    picks = solve_budget(costs, errors, [*table.weights, *table.weights], target_bits, allowed)
    return {"k": picks[:layers], "v": picks[layers:]}


def choice_transform(search: PrecisionSearch, table: CandidateTable, choice: dict[str, list[int]]) -> KVTransform:
    """The per-layer :class:`KVTransform` of a choice."""
    t = search.shell(len(table.weights))
    t.keys = [table.candidate("k", i, j) for i, j in enumerate(choice["k"])]
    t.values = [table.candidate("v", i, j) for i, j in enumerate(choice["v"])]
    t.name = f"search-{search.accounting}-{search.target_bits:g}b"
    return t


def choice_summary(table: CandidateTable, choice: dict[str, list[int]]) -> dict[str, float]:
    """Element-weighted mean bits (both accountings) and total proxy error of a choice."""
    w = np.concatenate([table.weights, table.weights])
    out: dict[str, float] = {}
    for acc in ACCOUNTINGS:
        b = [table.bits[k][acc][i, j] for k in ("k", "v") for i, j in enumerate(choice[k])]
        out[acc.replace("-", "_")] = float(np.dot(w, b) / w.sum())
    out["proxy"] = float(sum(table.error[k][i, j] for k in ("k", "v") for i, j in enumerate(choice[k])))
    return out


# -- artifact ------------------------------------------------------------------------------------------------------


def table_tensors(table: CandidateTable, choice: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The measured table and the choice as stacked tensors (``{k|v}_{quantity}``, layer-major)."""
    out: dict[str, torch.Tensor] = {"slot_elements": torch.from_numpy(table.weights.copy())}
    for k in ("k", "v"):
        out[f"{k}_proxy_error"] = torch.from_numpy(table.error[k].copy())
        out[f"{k}_bits_all_in"] = torch.from_numpy(table.bits[k]["all-in"].copy())
        out[f"{k}_bits_nominal"] = torch.from_numpy(table.bits[k]["nominal"].copy())
        out[f"{k}_choice"] = torch.tensor(choice[k], dtype=torch.int64)
    for b, fitted in table.nuq.items():  # the tables of every non-uniform candidate, for --resolve
        out |= {f"nuq{b}_{name}": t for name, t in fitted.stacked_tensors().items()}
    return out


def table_from(extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[CandidateTable, dict[str, list[int]]]:
    """Inverse of :func:`table_tensors` plus the candidate list kept in ``extra["search"]``."""
    cands = {k: [kvconfig.from_dict(c) for c in extra["search"]["candidates"][k]] for k in ("k", "v")}
    table = CandidateTable(
        candidates=cands,
        error={k: tensors[f"{k}_proxy_error"].numpy() for k in ("k", "v")},
        bits={
            k: {"all-in": tensors[f"{k}_bits_all_in"].numpy(), "nominal": tensors[f"{k}_bits_nominal"].numpy()}
            for k in ("k", "v")
        },
        weights=tensors["slot_elements"].numpy(),
    )
    layers = len(table.weights)
    for b in sorted({c.bits for c in cands["k"] + cands["v"] if isinstance(c, NonUniformQuantizer)}):
        kt = next(c for c in cands["k"] if isinstance(c, NonUniformQuantizer) and c.bits == b)
        vt = next(c for c in cands["v"] if isinstance(c, NonUniformQuantizer) and c.bits == b)
        prefix = f"nuq{b}_"
        own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        table.nuq[b] = KVTransform([kt] * layers, [vt] * layers).bind(own)
    return table, {k: tensors[f"{k}_choice"].tolist() for k in ("k", "v")}


def search_extra(table: CandidateTable, choice: dict[str, list[int]]) -> dict[str, Any]:
    """The search's JSON facts: candidates, labels of the choice, and its summary."""
    return {
        "search": {
            "candidates": {k: [kvconfig.to_dict(c) for c in table.candidates[k]] for k in ("k", "v")},
            "choice": {k: [table.candidates[k][j].label() for j in choice[k]] for k in ("k", "v")},
            "summary": choice_summary(table, choice),
        }
    }


def resolve_artifact(old: Artifact, target_bits: float, accounting: str) -> tuple[Artifact, KVTransform]:
    """Re-solve a precision-search artifact's measured table for a new budget (no model needed)."""
    method = kvconfig.from_dict(old.method)
    if not isinstance(method, PrecisionSearch):
        raise ArtifactError(f"made by {type(method).__name__}, not the precision search: it cannot be re-solved")
    search = dataclasses.replace(method, target_bits=target_bits, accounting=accounting)
    table, _ = table_from(old.extra, old.tensors)
    choice = solve(table, target_bits, accounting)
    transform = choice_transform(search, table, choice)
    art = calibration_artifact(
        old.model, search, old.inputs, transform, search_extra(table, choice), table_tensors(table, choice),
        search.seq_len,
    )  # fmt: skip
    return art, transform
