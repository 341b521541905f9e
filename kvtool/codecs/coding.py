"""Symbol coding of KV chunks: transform, quantize, entropy-code (and back), in two flavours.

* **calibrated** (:class:`CalibratedCoder`): a projection artifact (``kvtool calibrate --method pca|svd``) gives per
  layer and K/V the basis and mean, and one of its codec rate levels gives per component a step, a clamp and a
  static rANS table (:mod:`kvtool.codecs.ecsq`). Chunks carry only the coded words.
* **adaptive** (:class:`AdaptiveCoder`): no artifact. Per chunk, layer, K/V and channel a mean and a step
  (``quality`` × the channel's standard deviation, fp16) and per layer and K/V one table of the chunk's own
  symbols; all of it is stored in the chunk and counted.

Input of a chunk: per layer, pre-RoPE keys and values ``(kv_heads, n, head_dim)`` float32 (``n`` may be 0).
Symbols are laid out per layer, K then V, component-major (all tokens of component 0, then component 1, ...), and
cut into rANS lanes that never cross a layer, so any layer decodes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvtool.calibration import transform_of
from kvtool.codecs import rans
from kvtool.codecs.ecsq import MAX_K, Level, codec_levels, dequantize, quantize
from kvtool.errors import ArtifactError, UsageError
from kvtool.kernels import pick_backend, rans_decode, rans_encode, slot_stats, symbol_counts
from kvtool.quantizers.projection import ProjectionQuantizer

if TYPE_CHECKING:
    from kvtool.arch import ArchInfo
    from kvtool.artifacts import Artifact
    from kvtool.codecs.container import CodecSettings

KINDS = ("k", "v")


@dataclass
class CodedChunk:
    """What a chunk stores: ``words`` uint16 ``(W,)``, ``lanes`` ``(n_lanes,)`` words per lane, ``layer_lanes``
    ``(L,)`` lanes per layer, and the coder's side tensors (adaptive: means, steps, tables)."""

    words: torch.Tensor
    lanes: torch.Tensor
    layer_lanes: torch.Tensor
    side: dict[str, torch.Tensor]


@dataclass
class AnalysedBatch:
    """An adaptive batch ready to entropy-code (:meth:`AdaptiveCoder.analyse`): per chunk its side tensors (CPU),
    the chunks' symbols and table ids concatenated (on the coder's device), per chunk its symbols per layer, and the
    symbol counts ``(chunks · 2L, alphabet)`` (on the coder's device) the tables were quantized from."""

    sides: list[dict[str, torch.Tensor]]
    syms: torch.Tensor
    tids: torch.Tensor
    segments: list[list[int]]
    counts: torch.Tensor

    def code_length_bits(self) -> float:
        """The ideal code length of the symbols with their own tables (``Σ count · log2(PROB_SCALE / freq)``): what
        the rANS words hold, less the lanes' final states and flush losses (~0.1 %)."""
        freq = torch.cat([side["freq"] for side in self.sides]).to(torch.float64)
        counts = self.counts.to("cpu", torch.float64)
        return float((counts * torch.log2(rans.PROB_SCALE / freq.clamp_min(1))).sum())


def _from_slot_matrix(m: torch.Tensor, heads: int) -> torch.Tensor:
    """``(n, heads·head_dim)`` (head-major channels) → ``(heads, n, head_dim)``."""
    return m.reshape(m.shape[0], heads, m.shape[1] // heads).permute(1, 0, 2)


class _Coder:
    """Shared driver: per layer and kind, ``_symbols`` gives (symbols (n, C), table ids (C,)); they are laid out,
    lane-cut and rANS-coded in one batch."""

    lane_len = 4096
    backend = "torch"  #: rANS backend (:mod:`kvtool.kernels`): auto, torch or triton; same bytes either way
    device = torch.device("cpu")  #: where the rANS kernels run
    static_tables = False  #: the same tables for every chunk (calibrated) or per-chunk tables (adaptive)
    values_on_device = False  #: decode returns values on ``device`` (adaptive only) instead of the CPU

    def _tables(self, side: dict[str, torch.Tensor]) -> rans.Tables:
        raise NotImplementedError

    def symbols(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]], side: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The chunk's flat symbols, their table ids, and the symbols per layer (the stream layout)."""
        syms, tids, segments = [], [], []
        for i, (k, v) in enumerate(layers):
            count = 0
            for kind, x in zip(KINDS, (k, v), strict=True):
                s, t = self._symbols(i, kind, x, side)
                syms.append(s.T.reshape(-1))
                tids.append(t.repeat_interleave(s.shape[0]))
                count += s.numel()
            segments.append(count)
        return torch.cat(syms), torch.cat(tids), segments

    def side_and_symbols(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[int]]:
        """A chunk's side tensors (stored, on the CPU) and its flat symbols, table ids and symbols per layer."""
        side = self._side(layers)
        return (side, *self.symbols(layers, side))

    def _batch_tables(self, sides: list[dict[str, torch.Tensor]]) -> tuple[rans.Tables, list[int]]:
        """One table set for several chunks and each chunk's table-id offset (static tables: shared)."""
        if self.static_tables:
            return self._tables(sides[0]), [0] * len(sides)
        sets = [self._tables(side) for side in sides]
        offsets = torch.tensor([0, *[t.freq.shape[0] for t in sets]]).cumsum(0).tolist()[:-1]
        cat = rans.Tables(*(torch.cat([getattr(t, f) for t in sets]) for f in ("freq", "cum", "lut")))
        return cat, offsets

    def encode(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> CodedChunk:
        return self.encode_batch([layers])[0]

    def encode_batch(self, chunks: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[CodedChunk]:
        """Code several chunks in one pass of the coder (their lanes advance together; each chunk's bytes are
        exactly those it gets alone)."""
        coded = [self.side_and_symbols(layers) for layers in chunks]
        sides = [c[0] for c in coded]
        tables, offsets = self._batch_tables(sides)
        syms = torch.cat([c[1] for c in coded])
        tids = torch.cat([c[2] + off for c, off in zip(coded, offsets, strict=True)])
        return self._entropy_code(sides, syms, tids, [c[3] for c in coded], tables)

    def _entropy_code(
        self,
        sides: list[dict[str, torch.Tensor]],
        syms: torch.Tensor,
        tids: torch.Tensor,
        segments: list[list[int]],
        tables: rans.Tables,
    ) -> list[CodedChunk]:
        """rANS-code the chunks' concatenated symbols ``syms`` with table ids ``tids`` (into ``tables``; chunk
        ``c`` has ``segments[c][i]`` symbols in layer ``i``), all lanes in one pass; the words come back to the
        host as uint16."""
        lengths, per_layer = zip(*(rans.lane_lengths(seg, self.lane_len) for seg in segments), strict=True)
        words, lanes = rans_encode(syms.to(self.device), tids, tables, torch.cat(lengths), backend=self.backend)
        # uint16 words, narrowed where they were coded (half the bytes to copy back), exactly: int16 holds the
        # same 16 bits once the values above 32767 are moved down by 2^16
        words = torch.where(words >= 32768, words - 65536, words).to(torch.int16).cpu().view(torch.uint16)
        lanes = lanes.cpu()
        out, lane_at, word_at = [], 0, 0
        for per, side in zip(per_layer, sides, strict=True):
            n_lanes = int(per.sum())
            mine = lanes[lane_at : lane_at + n_lanes]
            n_words = int(mine.sum())
            # views of the batch's buffers, disjoint (an artifact may hold them: no copy of ~half a GB at 32K)
            out.append(CodedChunk(words[word_at : word_at + n_words], mine, per, side))
            lane_at, word_at = lane_at + n_lanes, word_at + n_words
        return out

    def decode(self, chunk: CodedChunk, counts: list[int], heads: int, head_dim: int) -> list[tuple[torch.Tensor, ...]]:
        """Per layer ``(keys, values)`` pre-RoPE ``(heads, n_i, head_dim)`` float32, ``counts[i] = n_i``."""
        return self.decode_batch([chunk], [counts], heads, head_dim)[0]

    def decode_batch(
        self, chunks: list[CodedChunk], counts: list[list[int]], heads: int, head_dim: int
    ) -> list[list[tuple[torch.Tensor, ...]]]:
        """:meth:`decode` of several chunks in one pass of the entropy decoder."""
        tables, offsets = self._batch_tables([c.side for c in chunks])
        layouts, small_ids, small_reps, lengths = [], [], [], []
        for chunk, cnt, off in zip(chunks, counts, offsets, strict=True):
            layout = [[self._coded(i, kind, chunk.side) for kind in KINDS] for i in range(len(cnt))]
            segments = [sum(int(c.numel()) * n for c in comps) for comps, n in zip(layout, cnt, strict=True)]
            lens, per_layer = rans.lane_lengths(segments, self.lane_len)
            if not torch.equal(per_layer, chunk.layer_lanes.to(torch.int64)):
                raise ValueError("the lane index does not match the chunk's layout")
            if chunk.lanes.numel() != lens.numel():
                raise ValueError("the lane lengths do not match the chunk's layout")
            for comps, n in zip(layout, cnt, strict=True):  # each component's table id, repeated for its n tokens
                for t in self._tids(comps):
                    small_ids.append(t + off)
                    small_reps.append(torch.full((t.numel(),), n, dtype=torch.int64))
            layouts.append(layout)
            lengths.append(lens)
        # each component's table id broadcast over its tokens: one repeat on the device the entropy decoder runs on
        # (a batch holds millions of symbols: no per-component tensors, and on a GPU no host copy of them)
        where = self.device if self.backend == "triton" else torch.device("cpu")
        if small_ids:
            tids = torch.repeat_interleave(torch.cat(small_ids).to(where, torch.int64),
                                           torch.cat(small_reps).to(where))  # fmt: skip
        else:
            tids = torch.zeros(0, dtype=torch.int64, device=where)
        flat = rans_decode(torch.cat([c.words for c in chunks]).to(self.device), torch.cat([c.lanes for c in chunks]),
                           tids, tables, torch.cat(lengths), backend=self.backend)  # fmt: skip
        if not self.values_on_device:
            flat = flat.cpu()
        results, at = [], 0
        for chunk, cnt, layout in zip(chunks, counts, layouts, strict=True):
            out = []
            side = {k: t.to(flat.device) for k, t in chunk.side.items()} if self.values_on_device else chunk.side
            for i, n in enumerate(cnt):
                pair = []
                for j, kind in enumerate(KINDS):
                    c = layout[i][j].numel()
                    sym = flat[at : at + c * n].reshape(c, n).T
                    at += c * n
                    pair.append(self._values(i, kind, sym, n, heads, head_dim, side))
                out.append(tuple(pair))
            results.append(out)
        return results

    def _tids(self, comps: list[torch.Tensor]) -> list[torch.Tensor]:
        return comps


class CalibratedCoder(_Coder):
    """Static tables from a projection artifact's codec level (see module docstring)."""

    static_tables = True

    def __init__(self, keys: list[ProjectionQuantizer], values: list[ProjectionQuantizer], level: Level):
        self.proj = {"k": keys, "v": values}
        self.level = level
        g, d = keys[0].blocks
        self.per_slot = g * d
        self.layers = len(keys)
        self._cache_tables: rans.Tables | None = None
        used = torch.nonzero(level.step > 0).reshape(-1)
        self.row = torch.full((level.step.numel(),), -1, dtype=torch.int64)
        self.row[used] = torch.arange(used.numel())
        self.used = used

    def _offset(self, layer: int, kind: str) -> int:
        return (KINDS.index(kind) * self.layers + layer) * self.per_slot

    def _coded(self, layer: int, kind: str, side: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self._offset(layer, kind)
        return torch.nonzero(self.level.step[o : o + self.per_slot] > 0).reshape(-1) + o  # global component ids

    def _tids(self, comps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.row[c] for c in comps]

    def _side(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {}

    def _tables(self, side: dict[str, torch.Tensor]) -> rans.Tables:
        if self._cache_tables is None:
            self._cache_tables = rans.build_tables(self.level.freq[self.used].to(torch.int64))
        return self._cache_tables

    def _symbols(self, layer: int, kind: str, x: torch.Tensor, side: dict) -> tuple[torch.Tensor, torch.Tensor]:
        comps = self._coded(layer, kind, side)
        c = self.proj[kind][layer].coefficients(x[None])[0]  # (G, n, d)
        # Explicit width: a layer with no tokens in this chunk (a sliding layer before its window) has n = 0.
        c = c.permute(1, 0, 2).reshape(x.shape[1], self.per_slot)[:, comps - self._offset(layer, kind)]
        return quantize(c, self.level.step[comps], self.level.kmax[comps]), self.row[comps]

    def _values(self, layer: int, kind: str, sym: torch.Tensor, n: int, heads: int, head_dim: int, side: dict):
        comps = self._coded(layer, kind, side)
        q = self.proj[kind][layer]
        g, d = q.blocks
        c = torch.zeros(n, self.per_slot)
        c[:, comps - self._offset(layer, kind)] = dequantize(sym, self.level.step[comps], self.level.kmax[comps])
        return q.reconstruct(c.reshape(n, g, d).permute(1, 0, 2)[None], torch.float32)[0]


class AdaptiveCoder(_Coder):
    """Per-chunk means, steps and tables (no artifact); ``quality``: step in standard deviations of the channel
    (larger where needed so that the channel's peak is within ``MAX_K`` steps: nothing is clipped)."""

    def __init__(self, layers: int, channels: int, quality: float):
        self.layers, self.channels, self.quality = layers, channels, quality

    def _coded(self, layer: int, kind: str, side: dict[str, torch.Tensor]) -> torch.Tensor:
        slot = KINDS.index(kind) * self.layers + layer
        live = side["step"][slot].float() > 0
        return torch.nonzero(live).reshape(-1) + slot * self.channels

    def _tids(self, comps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.full_like(c, int(c[0]) // self.channels) if c.numel() else c for c in comps]

    def side_and_symbols(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[int]]:
        batch = self.analyse([layers])
        return batch.sides[0], batch.syms, batch.tids, batch.segments[0]

    def encode_batch(self, chunks: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[CodedChunk]:
        """:meth:`_Coder.encode_batch` with the chunks' statistics and symbols computed together (the same values
        as chunk by chunk: every operation is per slot) and one table set built for all of them."""
        return self.encode_analysed(self.analyse(chunks))

    def encode_analysed(self, batch: AnalysedBatch) -> list[CodedChunk]:
        """Entropy-code an analysed batch (one table set for all its chunks)."""
        tables = rans.build_tables(torch.cat([side["freq"] for side in batch.sides]).to(torch.int64), lut=False)
        return self._entropy_code(batch.sides, batch.syms, batch.tids, batch.segments, tables)

    def analyse(self, chunks: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> AnalysedBatch:
        """Per chunk, per K/V slot with tokens: the mean and step of every channel, the symbols and the chunk's
        table (:class:`AnalysedBatch`; table ids: chunk ``c``'s slot ``s`` is table ``c · 2L + s``).

        The slots of all chunks with the same token count are stacked and done together (a batch of a
        full-attention model: a few dozen operations, not a few per chunk and layer), on the device the tensors are
        on; every reduction is order-free (:mod:`kvtool.codecs.slot_stats`, integer counts), so the bytes are the
        same on every device and whatever the batch."""
        n_layers, slots, a = self.layers, 2 * self.layers, 2 * MAX_K + 1
        n_chunks = len(chunks)
        device = next((x.device for layers in chunks for pair in layers for x in pair), torch.device("cpu"))
        mean = torch.zeros(n_chunks * slots, self.channels, dtype=torch.float16, device=device)
        step = torch.zeros(n_chunks * slots, self.channels, dtype=torch.float16, device=device)
        counts = torch.zeros(n_chunks * slots, a, dtype=torch.int64, device=device)
        groups: dict[int, list[tuple[int, torch.Tensor]]] = {}  # token count -> (row = chunk·slots + slot, x)
        for c, layers in enumerate(chunks):
            for i, pair in enumerate(layers):
                for j, x in enumerate(pair):
                    if x.shape[1]:
                        groups.setdefault(x.shape[1], []).append((c * slots + j * n_layers + i, x))
        sym_of: dict[int, torch.Tensor] = {}
        for group in groups.values():
            idx = [row for row, _ in group]
            stats = slot_stats(torch.stack([x for _, x in group]), self.quality, self.backend)  # (G, heads, n, d)
            rows = torch.tensor(idx).to(device, non_blocking=True)
            counts[rows] = symbol_counts(stats.symbols, a, self.backend)
            mean[rows], step[rows] = stats.mean, stats.step
            sym_of |= dict(zip(idx, stats.symbols.unbind(0), strict=True))  # per slot, component-major
        # the tables where the counts are (exact integers: the same on every device), then one copy of each side
        # tensor to the host
        freq = rans.quantize_counts(counts, torch.full((n_chunks * slots,), a, device=device)).to(torch.int16).cpu()
        mean, step = mean.cpu(), step.cpu()
        sides, order, segments = [], [], []
        for c, layers in enumerate(chunks):
            base = c * slots
            # the stream: per layer, keys then values
            mine = [[base + slot for slot in (i, n_layers + i) if base + slot in sym_of] for i in range(len(layers))]
            order += [row for rows in mine for row in rows]
            segments.append([sum(sym_of[row].numel() for row in rows) for rows in mine])
            rows = slice(base, base + slots)
            # views of the batch's side tensors (contiguous rows): a copy per chunk of these 128 KiB tensors cost
            # ~0.7 ms each on the GPU host (fresh allocations at the mmap threshold), 0.28 s of a 32K encode
            sides.append({"mean": mean[rows], "step": step[rows], "freq": freq[rows]})
        if not order:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return AnalysedBatch(sides, empty, empty, segments, counts)
        syms = torch.cat([sym_of[row] for row in order])
        sizes = torch.tensor([sym_of[row].numel() for row in order], dtype=torch.int64)
        tids = torch.repeat_interleave(torch.tensor(order, dtype=torch.int32).to(device), sizes.to(device),
                                       output_size=int(sizes.sum()))  # sizes known here: no device round trip
        return AnalysedBatch(sides, syms, tids, segments, counts)

    def _tables(self, side: dict[str, torch.Tensor]) -> rans.Tables:
        return rans.build_tables(side["freq"].to(torch.int64))

    def _values(self, layer: int, kind: str, sym: torch.Tensor, n: int, heads: int, head_dim: int, side: dict):
        slot = KINDS.index(kind) * self.layers + layer
        if n == 0:
            return torch.zeros(heads, 0, head_dim, device=sym.device)
        kmax = torch.full((self.channels,), float(MAX_K), device=sym.device)
        m = dequantize(sym, side["step"][slot].float(), kmax) + side["mean"][slot].float()
        return _from_slot_matrix(m, heads)


# -- coders from a file's settings -------------------------------------------------------------------------------


def on_backend(coder: Any, backend: str, device: torch.device) -> Any:
    """Run ``coder``'s entropy coding with ``backend`` (``auto``: Triton on CUDA models); same bytes either way."""
    if coder is not None:
        use = pick_backend(backend, device)
        coder.backend = use
        coder.device = device if use == "triton" else torch.device("cpu")
    return coder


def make_coder(settings: CodecSettings, calibration: Artifact | None, arch: ArchInfo) -> Any:
    if settings.mode == "adaptive":
        adaptive = AdaptiveCoder(arch.num_layers, arch.num_kv_heads * arch.head_dim, settings.quality)
        adaptive.lane_len = settings.lane_symbols
        return adaptive
    if settings.mode != "calibrated":
        return None
    if calibration is None:
        raise UsageError("calibrated coding needs a calibration artifact (--calibration)")
    t = transform_of(calibration)
    levels = codec_levels(calibration.tensors)
    if not levels or not all(isinstance(q, ProjectionQuantizer) for q in t.keys + t.values):
        raise ArtifactError("the calibration artifact has no codec levels: make it with --method pca or svd")
    if not -len(levels) <= settings.level < len(levels):
        raise UsageError(f"level {settings.level} out of range: the artifact has {len(levels)} codec levels")
    coder = CalibratedCoder(t.keys, t.values, levels[settings.level])  # type: ignore[arg-type]
    coder.lane_len = settings.lane_symbols
    return coder


def pick_level(calibration: Artifact, bits: float) -> int:
    """The richest codec level whose calibrated rate is at most ``bits`` all-in bits per element."""
    levels = codec_levels(calibration.tensors)
    fits = [i for i, lv in enumerate(levels) if lv.expected_bits <= bits + 1e-9]
    if not fits:
        cheapest = min((lv.expected_bits for lv in levels), default=float("nan"))
        raise UsageError(f"--bits {bits:g} is below the artifact's cheapest codec level ({cheapest:.2f} bits)")
    return max(fits, key=lambda i: levels[i].expected_bits)
