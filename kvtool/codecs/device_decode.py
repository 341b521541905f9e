"""Whole-file, device-resident ``.kvz`` decode: file → bytes on the device → a cache in the model's dtype.

The straight pipeline an engine (or ``kvtool.load_cache`` on a CUDA model) runs:

1. read the data section of the file once (into pinned memory when the target is CUDA) and move it to the device
   in one transfer; the chunk CRC-32s are checked by the device itself on the bytes it decodes
   (:mod:`kvtool.codecs.crc`; version-1 files: CRCs and the content digest on host threads **while** the device
   decodes), and nothing is handed out before they pass;
2. build a small per-segment layout (a segment = one chunk's symbols of one layer; counts are arithmetic on the
   geometry, no per-token lists) and decode **every lane of every chunk in one kernel launch**
   (:mod:`kvtool.kernels.kvz_triton`; :func:`decode_symbols_reference` on CPU), dequantization fused, coefficients
   written component-major per K/V slot;
3. per layer on the device: the inverse transform (calibrated: the artifact's basis; adaptive: mean and step per
   chunk are already applied), the fp16 raw tokens merged in, RoPE at the layer's positions with the model's own
   rotation, and the cast to the model's dtype.

Layer-by-layer consumption stays possible: :func:`decode_file` returns one :class:`DecodedLayer` per layer and the
per-layer step 3 is :func:`finish_layer`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvtool.arch import apply_rope
from kvtool.artifacts import content_digest
from kvtool.capture import prefix_rope
from kvtool.codecs import rans
from kvtool.codecs.coding import AdaptiveCoder, CalibratedCoder
from kvtool.codecs.container import chunk_crc, host_threads
from kvtool.codecs.crc import chunk_crcs, padded_bytes, plan_chunk_crcs
from kvtool.codecs.decode import DecodedLayer
from kvtool.codecs.ecsq import MAX_K
from kvtool.codecs.staging import staging_buffer
from kvtool.errors import ArtifactError

TILE = 8  #: symbols per lane the fused kernel stores together; each segment's output is padded to it
#: bytes per block of the device CRC check (a lane each; a chunk folds its blocks in order): large enough that the
#: per-chunk fold stays short, small enough for ~6·10^4 lanes on a 32K-token file (H100, 476 MB: 1,024 B 4.1 ms of
#: kernels, 4,096 B 1.7 ms, 8,192 B 1.5 ms, 16,384 B 1.6 ms); smaller when interpreted (tests)
CRC_BLOCK = int(os.environ.get("KVTOOL_CRC_BLOCK", "8192"))
CRC_BLOCK_INTERPRETED = 64

# -- host side: one read, checks in the background ------------------------------------------------------------------


READ_PIECE = 32 << 20  #: bytes per parallel read


def read_data(kvz: Any, pin: bool) -> torch.Tensor:
    """The file's data section as one uint8 tensor (in the pinned staging buffer when ``pin``), read by
    :func:`read_pieces`. A file
    given as bytes in memory is a view of them (a pinned uint8 tensor is used as it is; other buffers are copied
    into the staging buffer when ``pin``)."""
    size = kvz.size - kvz._data_start
    if kvz.buffer is not None:
        src = kvz.buffer if isinstance(kvz.buffer, torch.Tensor) else torch.frombuffer(kvz.buffer, dtype=torch.uint8)
        src = src[kvz._data_start :]
        if not pin or src.is_pinned():
            return src
        buf = staging_buffer(size, pin)
        buf.copy_(src)
        return buf
    buf = staging_buffer(size, pin)
    fd = os.open(kvz.path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(host_threads()) as pool:
            got = sum(f.result() for f in read_pieces(pool, fd, buf, kvz._data_start))
    finally:
        os.close(fd)
    if got != size:
        raise ArtifactError(f"{kvz.path}: truncated while reading the chunks")
    return buf


def read_pieces(pool: ThreadPoolExecutor, fd: int, buf: torch.Tensor, offset: int,
                then: Callable[[int, int], None] | None = None) -> list[Future[int]]:  # fmt: skip
    """Read ``buf.numel()`` bytes of ``fd`` from ``offset`` into ``buf`` (uint8, CPU) by parallel ``preadv`` calls
    of :data:`READ_PIECE` bytes on ``pool`` (a page-cache copy is a memory copy: several threads move more bytes
    per second); ``then(at, n)`` runs after each piece is read. Returns the futures of the bytes each piece got."""
    view = memoryview(buf.numpy())

    def piece(at: int) -> int:
        got = os.preadv(fd, [view[at : at + READ_PIECE]], offset + at)
        if then is not None and got:
            then(at, got)
        return got

    return [pool.submit(piece, at) for at in range(0, buf.numel(), READ_PIECE)]


class Prefetch:
    """A ``.kvz``'s data section on its way to a CUDA device **before** its header is parsed: the copy (and, for a
    file, the parallel reads into the pinned staging buffer, each piece sent on as soon as it is read) runs while
    the host validates the header and builds the layout. Only the 8-byte header length is read up front: nothing
    is trusted from it, :func:`decode_file` uses the copy only if the parsed file says the same data section, and
    the chunk CRCs (seeded by the parsed metadata) bind the copied bytes to it.

    ``source``: a path or a pinned CPU uint8 tensor (other sources are read by :func:`decode_file` itself).
    :meth:`close` waits for the reads and the copy (call it on every path: the staging buffer and a caller's
    pinned buffer must not be in use once the call returns)."""

    def __init__(self, source: Any, device: torch.device):
        self.device, self.start, self.host, self.dev = device, -1, None, None
        self.side = torch.cuda.Stream(device)
        self._pool: ThreadPoolExecutor | None = None
        self._reads: list[Any] = []
        self._fd = -1
        try:
            self._begin(source)
        except (OSError, ValueError, RuntimeError):  # the parse reports a bad or unreadable file properly
            self.close()
            self.host = self.dev = None

    def _begin(self, source: Any) -> None:
        from kvtool.artifacts import max_artifact_bytes

        if isinstance(source, torch.Tensor):
            if not (source.dtype == torch.uint8 and source.dim() == 1 and source.is_pinned() and source.numel() >= 8):
                return
            size, head = source.numel(), int.from_bytes(source[:8].numpy().tobytes(), "little")
        else:
            self._fd = os.open(os.fspath(source), os.O_RDONLY)
            size, head = os.fstat(self._fd).st_size, int.from_bytes(os.pread(self._fd, 8, 0), "little")
        start = 8 + head
        if not 8 <= start <= size or size > max_artifact_bytes():
            return
        n = size - start
        self.dev = padded_bytes(n, self.device)
        self.start = start
        if isinstance(source, torch.Tensor):
            self.host = source[start:]
            with torch.cuda.stream(self.side):
                self.dev.copy_(self.host, non_blocking=True)
            return
        self.host = staging_buffer(n, pin=True)
        host, dev, side = self.host, self.dev, self.side

        def send(at: int, got: int) -> None:  # each piece on its way as soon as it is read
            with torch.cuda.stream(side):
                dev[at : at + got].copy_(host[at : at + got], non_blocking=True)

        self._pool = ThreadPoolExecutor(host_threads())
        self._reads = read_pieces(self._pool, self._fd, host, start, send)

    def data(self, kvz: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(host, device)`` views of ``kvz``'s data section once every piece is read (the device copy may still
        be in flight on :attr:`side`), or ``None`` if this prefetch does not hold ``kvz``'s data section."""
        if self.dev is None or self.start != kvz._data_start or self.dev.numel() != kvz.size - kvz._data_start:
            return None
        if sum(f.result() for f in self._reads) != self.dev.numel() and self._reads:
            raise ArtifactError(f"{kvz.path}: truncated while reading the chunks")
        return self.host, self.dev

    def close(self) -> None:
        for f in self._reads:
            f.exception()  # waits; a failed read was reported by data() or is moot
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.side.synchronize()


class HostChecks:
    """The chunk CRC-32s and the content digest over the data already in host memory, on a thread pool (zlib and
    hashlib release the GIL on large buffers). :func:`decode_file` runs them once every kernel is queued, so the
    device decodes meanwhile; on a worker thread started earlier they slowed the host's own layout work (GIL
    contention) by more than they overlapped. :meth:`result` raises what failed."""

    def __init__(self, kvz: Any, data: torch.Tensor):
        self.kvz, self.view, self.error = kvz, memoryview(data.numpy()), None

    def _bytes(self, name: str) -> memoryview:
        begin, end = self.kvz._header[name]["data_offsets"]
        return self.view[begin:end]

    def _chunk_crc(self, group: list[str]) -> int:
        return chunk_crc({name: self._bytes(name) for name in group}, self.kvz._crc_seed)

    def run(self) -> None:
        try:
            kvz = self.kvz
            names = sorted(kvz._expected)
            by_chunk: dict[int, list[str]] = {}
            for name in names:
                if name.startswith("chunk."):
                    by_chunk.setdefault(int(name[6:12]), []).append(name)
            with ThreadPoolExecutor(host_threads()) as pool:
                # version 1 files need the whole-file digest; version 2 chunk CRCs are seeded by the metadata
                digest = pool.submit(self._digest) if not kvz._crc_seed else None
                crcs = list(pool.map(self._chunk_crc, [by_chunk[c] for c in sorted(by_chunk)]))
                for c, crc in enumerate(crcs):
                    if crc != kvz.chunks[c]["crc32"]:
                        raise ArtifactError(f"{kvz.path}: chunk {c} is corrupted (CRC-32 mismatch)")
                if digest is not None:
                    digest.result()
        except BaseException as e:  # noqa: BLE001 - handed to the caller in result()
            self.error = e

    def _digest(self) -> None:
        kvz = self.kvz
        if content_digest(kvz._meta, kvz._header, self.view) != kvz.content_digest:
            raise ArtifactError(f"{kvz.path}: content digest mismatch: the file is corrupted or was modified")

    def result(self) -> None:
        if self.error is not None:
            raise self.error


# -- the layout the kernel decodes ----------------------------------------------------------------------------------


def _tensor_view(data: torch.Tensor, kvz: Any, name: str) -> torch.Tensor:
    from kvtool.artifacts import torch_dtype

    info = kvz._header[name]
    begin, end = info["data_offsets"]
    return data[begin:end].view(torch_dtype(info["dtype"])).reshape(info["shape"])


def _gather_chunks(data: torch.Tensor, kvz: Any, part: str, n_chunks: int) -> torch.Tensor:
    """The ``part`` tensor of every chunk, concatenated in chunk order (flat, in its dtype), by one gather on
    ``data``'s device: the pieces are interleaved with the other chunk tensors in the file, and one view per
    chunk would cost a few Python-level tensor operations each (hundreds of chunks at 32K tokens)."""
    from kvtool.artifacts import torch_dtype

    infos = [kvz._header[f"chunk.{c:06d}.{part}"] for c in range(n_chunks)]
    dtype = torch_dtype(infos[0]["dtype"]) if infos else torch.uint8
    begins = torch.tensor([i["data_offsets"][0] for i in infos], dtype=torch.int64)
    sizes = torch.tensor([i["data_offsets"][1] - i["data_offsets"][0] for i in infos], dtype=torch.int64)
    total = int(sizes.sum())
    if total == 0:
        return torch.zeros(0, dtype=dtype, device=data.device)
    starts = (begins - (sizes.cumsum(0) - sizes)).to(data.device, non_blocking=True)
    idx = torch.repeat_interleave(starts, sizes.to(data.device, non_blocking=True), output_size=total)
    idx += torch.arange(total, device=data.device)
    return data[idx].view(dtype)


def build_layout(kvz: Any, coder: Any, data: torch.Tensor, stages: Any = None, ready: Any = None) -> dict[str, Any]:
    """Every argument of the fused decode kernel, on ``data``'s device (``data``: the file's data section there):
    per lane its words and symbols, per segment its counts, per component (calibrated) or per chunk and channel
    (adaptive) the table, step and mean. The geometry is arithmetic on the header's numbers (host); whatever comes
    from the file's bytes is read where the bytes are; ``ready`` (if given) is called before the first such read
    (the bytes may still be in flight on another stream)."""
    device = data.device
    geo, arch = kvz.geometry, kvz.arch
    n_layers, n_chunks = arch.num_layers, geo.num_chunks
    n_slots, channels = 2 * n_layers, arch.num_kv_heads * arch.head_dim
    seg = geo.segments()
    adaptive = isinstance(coder, AdaptiveCoder)
    # coded components per slot (kind · L + layer)
    if adaptive:
        ck = torch.full((n_layers,), channels, dtype=torch.int64)
        cv = ck.clone()
        comps = [torch.arange(channels)] * n_slots
    else:
        comps = [coder._coded(i % n_layers, "kv"[i // n_layers], {}) - coder._offset(i % n_layers, "kv"[i // n_layers])
                 for i in range(n_slots)]  # fmt: skip
        ck = torch.tensor([comps[i].numel() for i in range(n_layers)], dtype=torch.int64)
        cv = torch.tensor([comps[n_layers + i].numel() for i in range(n_layers)], dtype=torch.int64)
    layer_of = torch.arange(n_layers).repeat(n_chunks)
    chunk_of = torch.arange(n_chunks).repeat_interleave(n_layers)
    sym = seg.coded * (ck[layer_of] + cv[layer_of])  # symbols per segment
    if sym.numel() and int(sym.max()) >= 1 << 31:
        raise ArtifactError(f"{kvz.path}: a chunk holds more than 2^31 symbols of one layer: use smaller chunks")
    lane_len = kvz.settings.lane_symbols
    lanes_per_seg = (sym + lane_len - 1) // lane_len
    n_lanes = int(lanes_per_seg.sum())
    # per lane (hundreds of thousands): expanded from the per-segment counts on the device itself
    seg_dev, lps_dev = sym.to(device, non_blocking=True), lanes_per_seg.to(device, non_blocking=True)
    lane_seg = torch.repeat_interleave(torch.arange(sym.numel(), device=device), lps_dev, output_size=n_lanes)
    lane_idx = torch.arange(n_lanes, device=device) - (lps_dev.cumsum(0) - lps_dev)[lane_seg]
    lane_off = lane_idx * lane_len
    lane_len_t = (seg_dev[lane_seg] - lane_off).clamp_max(lane_len)  # a fill, not a blocking host copy
    max_len = min(lane_len, int(sym.max())) if n_lanes else 0
    # words: the data section as 16-bit words; each chunk's lanes start at its `words` tensor
    if sum(kvz._header[f"chunk.{c:06d}.lanes"]["shape"][0] for c in range(n_chunks)) != n_lanes:
        raise ArtifactError(f"{kvz.path}: the lane index does not match the chunks' layout")
    mark = (stages or _Stages(None, device)).mark
    mark("layout.segments")
    if ready is not None:  # from here on the file's bytes are read on the device
        ready()
    per_lane = _gather_chunks(data, kvz, "lanes", n_chunks).to(torch.int64)
    layer_lanes = _gather_chunks(data, kvz, "layer_lanes", n_chunks)
    # checks of what is in the file's bytes are flags on the device, read once at the end (no host round trip
    # per check while the transfer and kernels run); nothing is handed out before they pass
    problems: list[tuple[torch.Tensor, str]] = [
        ((layer_lanes.reshape(-1).to(torch.int64) != lps_dev).any(), "the lane index does not match the chunks' layout")
    ]  # fmt: skip
    word_base = torch.tensor([kvz._header[f"chunk.{c:06d}.words"]["data_offsets"][0] // 2 for c in range(n_chunks)])
    lanes_of_chunk = lanes_per_seg.reshape(n_chunks, n_layers).sum(1)
    lane_chunk = torch.repeat_interleave(torch.arange(n_chunks, device=device),
                                         lanes_of_chunk.to(device, non_blocking=True), output_size=n_lanes)  # fmt: skip
    chunk_first = (lanes_of_chunk.cumsum(0) - lanes_of_chunk).to(device, non_blocking=True)
    within = per_lane.cumsum(0) - per_lane  # on the device: words before each lane, from the file's lane index
    if n_lanes:
        within = within - within[chunk_first.clamp_max(n_lanes - 1)][lane_chunk]
    lane_word = word_base.to(device, non_blocking=True)[lane_chunk] + within
    mark("layout.lanes")
    # where each segment's symbols land in the output: in segment order, each padded to the kernel's store tile
    padded = (sym + TILE - 1) // TILE * TILE
    seg_out = padded.cumsum(0) - padded
    widths = torch.cat([ck, cv])
    host = {"seg_out": seg_out.tolist(), "coded": seg.coded.tolist(), "widths": widths.tolist(),
            "ck": ck.tolist()}  # fmt: skip
    if any(kvz._header[f"chunk.{c:06d}.words"]["data_offsets"][0] % 2 for c in range(n_chunks)):
        raise ArtifactError(f"{kvz.path}: coded words are not 2-byte aligned in the file")
    out = {"host": host, "n_lanes": n_lanes, "max_len": max_len, "n_slots": n_slots,
           "channels": channels, "prob_bits": rans.PROB_BITS, "adaptive": adaptive,
           "lane_word": lane_word, "lane_words": per_lane, "lane_len": lane_len_t, "lane_seg": lane_seg,
           "lane_off": lane_off, "seg_n": seg.coded, "seg_ck": ck[layer_of], "seg_slot": layer_of,
           "seg_chunk": chunk_of, "seg_out": seg_out, "out_size": int(padded.sum()), "comps": comps,
           "tile": TILE}  # fmt: skip
    if adaptive:
        step = _gather_chunks(data, kvz, "step", n_chunks).reshape(n_chunks, n_slots, channels)
        mean = _gather_chunks(data, kvz, "mean", n_chunks).reshape(n_chunks, n_slots, channels)
        freq = _gather_chunks(data, kvz, "freq", n_chunks).reshape(n_chunks * n_slots, -1)
        live = (seg.coded.reshape(n_chunks, n_layers).repeat(1, 2) > 0).to(device, non_blocking=True)  # (C, 2L)
        problems.append((((step <= 0) & live[:, :, None]).any(), "a coded channel has no positive step"))
        out |= {"comp_step": step.float().reshape(-1), "comp_mean": mean.float().reshape(-1),
                "comp_base": torch.zeros(1, dtype=torch.int64), "comp_tid": torch.zeros(1, dtype=torch.int64),
                "comp_kmax": torch.zeros(1)}  # fmt: skip
        mark("layout.side")
        freq = freq.to(torch.int64)
        problems.append(
            (
                ((freq.sum(1) != rans.PROB_SCALE) | (freq < 0).any(1)).any(),
                "a chunk's rANS table is "
                f"malformed (every frequency row must be non-negative and sum to {rans.PROB_SCALE})",
            )
        )
        tables = rans.build_tables(freq, check=False)
    else:
        level = coder.level
        glob = [comps[i] + coder._offset(i % n_layers, "kv"[i // n_layers]) for i in range(n_slots)]
        flat = torch.cat(glob) if glob else torch.zeros(0, dtype=torch.int64)
        counts = torch.tensor([g.numel() for g in glob], dtype=torch.int64)
        out |= {"comp_base": counts.cumsum(0) - counts, "comp_tid": coder.row[flat],
                "comp_step": level.step[flat].float(), "comp_kmax": level.kmax[flat].float(),
                "comp_mean": torch.zeros(1)}  # fmt: skip
        tables = coder._tables({})
    mark("layout.tables")
    out["alphabet"] = tables.freq.shape[1]
    out["problems"] = problems
    # a malformed table (refused above, after decoding) must still keep every lookup inside the tables
    out["lut"] = tables.lut.clamp_max(tables.freq.shape[1] - 1)
    out["fc"] = (tables.freq | (tables.cum[:, :-1] << 16)).to(torch.int32)
    for k, v in list(out.items()):
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
    return out


def decode_symbols_reference(args: dict[str, Any], out: torch.Tensor, bad: torch.Tensor) -> None:
    """Torch reference of :func:`kvtool.kernels.kvz_triton.decode_file_triton` (same arguments, same values):
    the lanes are decoded by :func:`kvtool.codecs.rans.decode_reference` with table ids derived from the layout,
    then each symbol is dequantized and stored at its component-major place."""
    n_lanes = int(args["n_lanes"])
    if n_lanes == 0:
        return
    dev = out.device
    lane_len = args["lane_len"].cpu()
    seg = args["lane_seg"].cpu()
    j = torch.repeat_interleave(args["lane_off"].cpu(), lane_len)
    j = j + torch.arange(j.numel()) - torch.repeat_interleave(lane_len.cumsum(0) - lane_len, lane_len)
    s_of = torch.repeat_interleave(seg, lane_len)
    n = args["seg_n"].cpu()[s_of].clamp_min(1)
    ck = args["seg_ck"].cpu()[s_of]
    is_v = j >= n * ck
    jj = j - torch.where(is_v, n * ck, 0)
    comp = jj // n
    slot = args["seg_slot"].cpu()[s_of] + torch.where(is_v, args["n_slots"] // 2, 0)
    if args["adaptive"]:
        t = args["seg_chunk"].cpu()[s_of] * args["n_slots"] + slot
        cidx = t * args["channels"] + comp
    else:
        cidx = args["comp_base"].cpu()[slot] + comp
        t = args["comp_tid"].cpu()[cidx]
    fc = args["fc"].cpu().to(torch.int64)
    tables = rans.Tables(fc & 0xFFFF, torch.cat([fc >> 16, torch.full((fc.shape[0], 1), rans.PROB_SCALE)], 1),
                         args["lut"].cpu())  # fmt: skip
    word_idx = torch.repeat_interleave(args["lane_word"].cpu(), args["lane_words"].cpu())
    word_idx = (
        word_idx
        + torch.arange(word_idx.numel())
        - torch.repeat_interleave(
            args["lane_words"].cpu().cumsum(0) - args["lane_words"].cpu(), args["lane_words"].cpu()
        )
    )
    words = args["words"].cpu().to(torch.int64)[word_idx] & 0xFFFF
    try:
        sym = rans.decode_reference(words, args["lane_words"].cpu(), t, tables, lane_len)
        bad.zero_()
    except ValueError:
        bad.fill_(1)
        return
    step = args["comp_step"].cpu()[cidx]
    if args["adaptive"]:
        value = (sym.to(torch.float32) - float(MAX_K)) * step + args["comp_mean"].cpu()[cidx]
    else:
        value = (sym.to(torch.float32) - args["comp_kmax"].cpu()[cidx]) * step
    where = args["seg_out"].cpu()[s_of] + j
    out.view(-1)[where.to(dev)] = value.to(dev)


# -- per layer: transform back, raw tokens, RoPE ----------------------------------------------------------------


def raw_tokens(kvz: Any, data: torch.Tensor, seg: Any) -> list[torch.Tensor]:
    """Per layer its fp16 raw tokens, ``(2, heads, n_raw, head_dim)`` in position order, gathered from the chunks
    (only the first and last chunks hold any: sinks and recent tokens)."""
    n_layers, heads, dim = kvz.arch.num_layers, kvz.arch.num_kv_heads, kvz.arch.head_dim
    counts = seg.raw.reshape(-1, n_layers).tolist()
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for c, r in enumerate(counts):
        if not any(r):
            continue
        raw = _tensor_view(data, kvz, f"chunk.{c:06d}.raw")
        at = 0
        for layer, n in enumerate(r):
            parts[layer].append(raw[at : at + 2 * heads * n * dim].reshape(2, heads, n, dim))
            at += 2 * heads * n * dim
    return [torch.cat(p, dim=2) if p else torch.zeros(2, heads, 0, dim, dtype=torch.float16) for p in parts]


def finish_layer(
    kvz: Any, coder: Any, layout: dict[str, Any], coef: torch.Tensor, raw: torch.Tensor, layer: int,
    rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, keep_pre_rope: bool,
) -> DecodedLayer:  # fmt: skip
    """Layer ``layer``'s keys and values from its coefficient matrices (``coef``: the kernel output) and raw tokens,
    RoPE applied, in ``dtype`` on the coefficients' device."""
    arch, geo, host = kvz.arch, kvz.geometry, layout["host"]
    heads, dim, n_layers = arch.num_kv_heads, arch.head_dim, arch.num_layers
    lo, hi = geo.layer_range(layer)
    # raw positions are sinks and recent tokens, so the coded ones are one contiguous run [a, b) of [lo, hi)
    a, b = geo.coded_run(layer)
    pair = []
    for kind in range(2):
        slot = kind * n_layers + layer
        m = _slot_matrix(coef, host, layer, kind, n_layers, kvz.geometry.num_chunks)  # (width, rows)
        rows = m.shape[1]
        if isinstance(coder, CalibratedCoder):
            q = coder.proj["kv"[kind]][layer]
            g, d = q.blocks
            full = torch.zeros(rows, g * d, device=coef.device)
            full[:, layout["comps"][slot].to(coef.device)] = m.T
            q_dev = _on_device(q, coef.device)
            x = q_dev.reconstruct(full.reshape(rows, g, d).permute(1, 0, 2)[None], torch.float32)[0]
        else:
            x = m.T.reshape(rows, heads, dim).permute(1, 0, 2)
        pair.append(x)
    if pair[0].shape[1] != b - a or raw.shape[2] != (hi - lo) - (b - a):
        raise ArtifactError(f"{kvz.path}: layer {layer} decodes to {pair[0].shape[1]} coded tokens, not {b - a}")
    head = a - lo  # raw tokens before the coded run (sinks), then the coded run, then the rest (recent)
    r = raw.to(coef.device, torch.float32)
    keys = torch.cat([r[0][:, :head], pair[0], r[0][:, head:]], dim=1)
    values = torch.cat([r[1][:, :head], pair[1], r[1][:, head:]], dim=1)
    cos, sin = rope
    post = apply_rope(keys[None], cos, sin)[0]
    pre = keys.to(dtype)[None] if keep_pre_rope else None
    return DecodedLayer(post.to(dtype)[None], pre, values.to(dtype)[None], torch.arange(lo, hi))


def _slot_matrix(coef: torch.Tensor, host: dict[str, Any], layer: int, kind: int, n_layers: int,
                 n_chunks: int) -> torch.Tensor:  # fmt: skip
    """One K/V slot's coefficients ``(width, rows)``: its block ``(width, n_c)`` of every chunk side by side. Runs
    of chunks with the same token count sit at a fixed stride in the output, so each run is one strided view
    (one copy for the whole slot, not one per chunk)."""
    width, ck = host["widths"][kind * n_layers + layer], host["ck"][layer]
    runs: list[list[int]] = []  # [first chunk, chunks, n, stride]
    for c in range(n_chunks):
        g = c * n_layers + layer
        n = host["coded"][g]
        if not n:
            continue
        start = host["seg_out"][g] + kind * ck * n
        last = runs[-1] if runs else None
        if last and last[2] == n and (last[1] == 1 or start - last[0] == last[1] * last[3]):
            if last[1] == 1:
                last[3] = start - last[0]
            if start - last[0] == last[1] * last[3]:
                last[1] += 1
                continue
        runs.append([start, 1, n, 0])
    parts = [coef.as_strided((count, width, n), (stride, n, 1), start).permute(1, 0, 2).reshape(width, count * n)
             for start, count, n, stride in runs]  # fmt: skip
    return torch.cat(parts, dim=1) if parts else coef.new_zeros(width, 0)


_ON_DEVICE: dict[tuple[int, str], Any] = {}


def _on_device(q: Any, device: torch.device) -> Any:
    """A copy of the projection ``q`` with its tensors on ``device`` (cached per quantizer and device)."""
    import dataclasses

    key = (id(q), str(device))
    if key not in _ON_DEVICE or _ON_DEVICE[key][0] is not q:
        moved = {f.name: getattr(q, f.name).to(device) for f in dataclasses.fields(q)
                 if isinstance(getattr(q, f.name), torch.Tensor)}  # fmt: skip
        _ON_DEVICE[key] = (q, dataclasses.replace(q, **moved))
    return _ON_DEVICE[key][1]


def _is_pow2(n: int) -> bool:
    return n >= 2 and not n & (n - 1)


def finish_adaptive(
    kvz: Any, layout: dict[str, Any], coef: torch.Tensor, raws: list[torch.Tensor],
    ropes: list[tuple[torch.Tensor, ...]], dtype: torch.dtype, keep_pre_rope: bool, stages: Any = None,
) -> list[DecodedLayer]:  # fmt: skip
    """Every layer of an adaptive file in one kernel launch (:func:`kvtool.kernels.kvz_triton
    .finish_adaptive_triton`): coded tokens from ``coef`` with RoPE, cast to ``dtype`` and written in place in one
    buffer that the returned layers view; the few raw (fp16) tokens are placed after. Same values as
    :func:`finish_layer` per layer."""
    from kvtool.kernels.kvz_triton import finish_adaptive_triton

    arch, geo, s = kvz.arch, kvz.geometry, kvz.settings
    heads, dim, n_layers, device = arch.num_kv_heads, arch.head_dim, arch.num_layers, coef.device
    ranges = [geo.layer_range(i) for i in range(n_layers)]
    lens = torch.tensor([hi - lo for lo, hi in ranges], dtype=torch.int64)
    per_layer = 2 * heads * dim * lens
    base = per_layer.cumsum(0) - per_layer
    out = torch.empty(int(per_layer.sum()), dtype=dtype, device=device)
    pre = torch.empty(int(per_layer.sum()) // 2, dtype=dtype, device=device) if keep_pre_rope else None
    # per segment (chunk c, layer l): the first position of the layer's coded run inside the chunk
    lo = torch.tensor([r[0] for r in ranges], dtype=torch.int64)
    run_a = torch.tensor([geo.coded_run(i)[0] for i in range(n_layers)], dtype=torch.int64)
    a = torch.arange(geo.num_chunks, dtype=torch.int64)[:, None] * s.chunk_tokens
    b = (a + s.chunk_tokens).clamp_max(kvz.tokens)
    p0 = torch.minimum(torch.maximum(a, run_a[None, :]), b)
    # distinct rotary tables stacked; per layer its index
    tables: dict[int, int] = {}
    for cos, _ in ropes:
        tables.setdefault(id(cos), len(tables))
    uniq = {id(c): (c, sn) for c, sn in ropes}
    rope_index = [tables[id(c)] for c, _ in ropes]  # per layer: its table in cos_all / sin_all
    cos_all = torch.stack([uniq[k][0].reshape(-1, dim) for k in tables]).contiguous()
    sin_all = torch.stack([uniq[k][1].reshape(-1, dim) for k in tables]).contiguous()
    args = {"n_segments": len(layout["host"]["coded"]), "max_n": max(layout["host"]["coded"], default=0),
            "heads": heads, "head_dim": dim, "seg_out": layout["seg_out"], "seg_n": layout["seg_n"],
            "seg_slot": layout["seg_slot"], "seg_p0": p0.reshape(-1).to(device, non_blocking=True),
            "seg_chunk": layout["seg_chunk"], "comp_step": layout["comp_step"], "comp_mean": layout["comp_mean"],
            "n_slots": layout["n_slots"],
            "layer_base": base.to(device, non_blocking=True), "layer_lo": lo.to(device, non_blocking=True),
            "layer_len": lens.to(device, non_blocking=True), "layer_rope": torch.tensor(
                rope_index, dtype=torch.int64).to(device, non_blocking=True),
            "cos": cos_all, "sin": sin_all, "rope_tokens": cos_all.shape[1]}  # fmt: skip
    mark = (stages or _Stages(None, device)).mark
    mark("finish.args")
    finish_adaptive_triton(args, coef, out, pre)
    mark("finish.kernel")
    _place_raw(kvz, ranges, raws, cos_all, sin_all, rope_index, base, out, pre, dtype)
    layers = []
    for i, (lo_i, hi_i) in enumerate(ranges):
        n, at = hi_i - lo_i, int(base[i])
        keys = out[at : at + heads * n * dim].view(1, heads, n, dim)
        values = out[at + heads * n * dim : at + 2 * heads * n * dim].view(1, heads, n, dim)
        kpre = None if pre is None else pre[at // 2 : at // 2 + heads * n * dim].view(1, heads, n, dim)
        layers.append(DecodedLayer(keys, kpre, values, torch.arange(lo_i, hi_i)))
    return layers


def _place_raw(
    kvz: Any, ranges: list[tuple[int, int]], raws: list[torch.Tensor], cos_all: torch.Tensor, sin_all: torch.Tensor,
    rope_index: list[int], base: torch.Tensor, out: torch.Tensor, pre: torch.Tensor | None, dtype: torch.dtype,
) -> None:  # fmt: skip
    """The raw (fp16) tokens of every layer (``raws``: per layer ``(2, H, n_raw, D)``, the sinks before its coded
    run and the recent tokens after it; ``ranges``: per layer its positions ``[lo, hi)``) into ``out``/``pre`` at
    :func:`finish_adaptive`'s layout, keys rotated by
    their layer's table (``cos_all``/``sin_all`` ``(tables, tokens, D)``, ``rope_index`` per layer): all layers in
    a few device operations (one per layer cost ~0.3 ms each on a GPU, mostly launches)."""
    geo = kvz.geometry
    heads, dim = kvz.arch.num_kv_heads, kvz.arch.head_dim
    layer, pos = [], []
    for i, (raw, (lo_i, hi_i)) in enumerate(zip(raws, ranges, strict=True)):
        if raw.shape[2]:
            a_i, b_i = geo.coded_run(i)
            rows = [*range(lo_i, a_i), *range(b_i, hi_i)]
            layer += [i] * len(rows)
            pos += rows
    if not pos:
        return
    device = out.device
    x = torch.cat([raw for raw in raws if raw.shape[2]], dim=2).to(device, torch.float32)  # (2, H, R, D)
    lay, p = torch.tensor(layer), torch.tensor(pos)
    lo = torch.tensor([lo_i for lo_i, _ in ranges])
    n_l = torch.tensor([hi_i - lo_i for lo_i, hi_i in ranges])
    # host-to-device copies without a stream synchronisation (a blocking copy, or a .cpu(), here made the host
    # wait for the decode kernels before its remaining work: the CRC plan, the flags)
    table = torch.tensor(rope_index)[lay].to(device, non_blocking=True)
    p_dev = p.to(device, non_blocking=True)
    cos, sin = cos_all[table, p_dev], sin_all[table, p_dev]  # (R, D)
    keys = apply_rope(x[0][None], cos[None], sin[None])[0]  # (H, R, D)
    # rows of D elements: layer l's keys (H, n_l, D) start at base[l], its values H · n_l rows later
    h = torch.arange(heads)[:, None]
    krow = (base[lay] // dim)[None, :] + h * n_l[lay][None, :] + (p - lo[lay])[None, :]  # (H, R)
    vrow = krow + heads * n_l[lay][None, :]
    rows = out.view(-1, dim)
    rows[krow.to(device, non_blocking=True)] = keys.to(dtype)
    rows[vrow.to(device, non_blocking=True)] = x[1].to(dtype)
    if pre is not None:
        prow = (base[lay] // (2 * dim))[None, :] + h * n_l[lay][None, :] + (p - lo[lay])[None, :]
        pre.view(-1, dim)[prow.to(device, non_blocking=True)] = x[0].to(dtype)


class _Stages:
    """Wall time per stage when asked for (the device is synchronised at each mark, so only when profiling)."""

    def __init__(self, into: dict[str, float] | None, device: torch.device):
        self.into, self.device = into, device
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.into is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.t
        self.t = now


def decode_file(
    kvz: Any, model: Any, coder: Any, device: torch.device, dtype: torch.dtype, backend: str,
    keep_pre_rope: bool = False, timings: dict[str, float] | None = None, prefetch: Prefetch | None = None,
) -> list[DecodedLayer]:  # fmt: skip
    """Decode all of ``kvz`` onto ``device`` in ``dtype`` (see module docstring); ``backend`` ``triton`` runs the
    fused kernel, ``torch`` its reference. ``timings``: filled with seconds per stage (read, transfer, layout,
    decode, finish, checks), the device synchronised between stages. ``prefetch``: the data section already on
    its way to ``device`` (:class:`Prefetch`; the caller closes it)."""
    stages = _Stages(timings, device)
    got = prefetch.data(kvz) if prefetch is not None else None
    data = got[0] if got is not None else read_data(kvz, pin=device.type == "cuda")
    stages.mark("read")
    # version-2 files: the chunk CRC-32s are checked by the device on the bytes it decodes (a few kernels, see
    # kvtool.codecs.crc); version-1 files also need the whole-file digest, on host threads
    on_device = backend == "triton" and bool(kvz._crc_seed)
    checks = None if on_device else HostChecks(kvz, data)
    cuda = device.type == "cuda"
    try:
        ready: Any = None
        # the device copy is word-padded: the CRC kernel reads whole 32-bit words
        dev_data = padded_bytes(data.numel(), device) if (on_device or cuda) and got is None else data
        if cuda:  # the bulk copy on a side stream: the small host-built layout tensors do not queue behind it; the
            # main stream waits for it just before the first read of the bytes (build_layout calls ``ready``)
            main = torch.cuda.current_stream(device)
            if got is not None:  # already under way (Prefetch)
                side, dev_data = prefetch.side, got[1]
            else:
                side = torch.cuda.Stream(device)
                with torch.cuda.stream(side):
                    dev_data.copy_(data, non_blocking=True)
            dev_data.record_stream(side)

            def ready() -> None:
                main.wait_stream(side)
        elif on_device:
            dev_data.copy_(data)
        stages.mark("transfer")
        layout = build_layout(kvz, coder, dev_data, stages, ready)
        layout["words"] = dev_data[: dev_data.numel() // 2 * 2].view(torch.int16)
        # adaptive files on the Triton backend: one fused kernel finishes every layer (RoPE, cast, layout), and it
        # reads only the symbols the decode kernel wrote, so the coefficients need no zero fill
        # (the decode kernel then stores the symbols, one byte each, and the finish kernel dequantizes them)
        fused = backend == "triton" and layout["adaptive"] and _is_pow2(kvz.arch.head_dim)
        if fused:
            coef = torch.empty(layout["out_size"], dtype=torch.uint8, device=device)
        else:
            coef = torch.zeros(layout["out_size"], dtype=torch.float32, device=device)
        bad = torch.zeros(max(layout["n_lanes"], 1), dtype=torch.int32, device=device)
        stages.mark("layout")
        if backend == "triton":
            from kvtool.kernels.kvz_triton import decode_file_triton

            decode_file_triton(layout, coef, bad)
        else:
            decode_symbols_reference(layout, coef, bad)
        stages.mark("decode")
        raws = raw_tokens(kvz, dev_data, kvz.geometry.segments())
        ropes = prefix_rope(model, kvz.arch.num_layers, kvz.tokens, device)
        if fused:
            stages.mark("finish.rope")
            out = finish_adaptive(kvz, layout, coef, raws, ropes, dtype, keep_pre_rope, stages)
        else:
            out = []
            for i in range(kvz.arch.num_layers):
                lo, hi = kvz.geometry.layer_range(i)
                cos, sin = (t[:, lo:hi] for t in ropes[i])
                out.append(finish_layer(kvz, coder, layout, coef, raws[i], i, (cos, sin), dtype, keep_pre_rope))
        stages.mark("finish")
        # the device works through the queued kernels while the host checks the chunk CRCs (and, for version 1
        # files, the content digest) of the bytes it read, or the device checks them after decoding; then one
        # synchronisation reads every device flag
        if checks is not None:
            checks.run()
            crc_bad = torch.zeros(1, dtype=torch.bool, device=device)
        else:
            plan = plan_chunk_crcs(kvz, device, CRC_BLOCK if cuda else CRC_BLOCK_INTERPRETED)
            crc_bad = chunk_crcs(dev_data, plan, "triton") != plan.expected
        flags = torch.stack([crc_bad.any(), bad.any(), *(flag for flag, _ in layout["problems"])]).tolist()
    except BaseException:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # no kernel may still read the staging buffer a next call refills
        raise
    if checks is not None:
        checks.result()
    crc_failed, lanes_failed, *problems_failed = flags
    if crc_failed:
        c = int(crc_bad.nonzero()[0, 0])
        raise ArtifactError(f"{kvz.path}: chunk {c} is corrupted (CRC-32 mismatch)")
    for failed, why in zip(problems_failed, [why for _, why in layout["problems"]], strict=True):
        if failed:
            raise ArtifactError(f"{kvz.path}: {why}")
    if lanes_failed:
        raise ArtifactError(f"{kvz.path}: a coded stream is corrupted (a lane does not end where its length says)")
    stages.mark("checks")
    return out
