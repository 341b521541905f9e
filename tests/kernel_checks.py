"""Triton kernels against their torch references, exactly (run by ``test_kernels.py`` under TRITON_INTERPRET=1 on
tiny shapes, and on a GPU at real sizes: ``python tests/kernel_checks.py --device cuda --big``).

Checks, for every case: the Triton encoder's words equal the reference's; each backend decodes the other's stream
to the original symbols; on real KV chunks (the adaptive coder on KV of several shapes: 1 KV head, head_dim 64 /
128 / 256, odd token counts) the ``.kvz`` chunk bytes are identical across backends.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvtool.arch import apply_rope
from kvtool.codecs import rans
from kvtool.codecs.coding import AdaptiveCoder
from kvtool.codecs.ecsq import dequantize
from kvtool.codecs.slot_stats import slot_stats_reference
from kvtool.kernels import rans_decode, rans_encode
from kvtool.kernels.histogram_triton import symbol_counts_triton
from kvtool.kernels.rans_triton import decode_interleaved, deinterleave, interleave
from kvtool.kernels.rope_triton import rope_triton
from kvtool.kernels.stats_triton import slot_stats_triton


def _random_case(seed: int, n: int, tables_n: int, alphabet: int, lane_len: int, device: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(tables_n, alphabet, generator=gen) * 3, dim=1)
    tables = rans.build_tables(rans.quantize_counts((probs * 1e6).long(), torch.full((tables_n,), alphabet)))
    tid = torch.randint(0, tables_n, (n,), generator=gen)
    sym = torch.multinomial(probs[tid], 1, generator=gen)[:, 0]
    cut = sorted(torch.randint(0, n + 1, (3,), generator=gen).tolist())
    lengths, _ = rans.lane_lengths([cut[0], cut[1] - cut[0], 0, cut[2] - cut[1], n - cut[2]], lane_len)
    ref_w, ref_l = rans.encode_reference(sym, tid, tables, lengths)
    tri_w, tri_l = rans_encode(sym.to(device), tid.to(device), tables, lengths, backend="triton")
    assert torch.equal(ref_w, tri_w.cpu()) and torch.equal(ref_l, tri_l.cpu()), f"encode differs (seed {seed})"
    back = rans_decode(ref_w.to(device), ref_l, tid.to(device), tables, lengths, backend="triton")
    assert torch.equal(back.cpu(), sym), f"triton decode of the reference stream differs (seed {seed})"
    assert torch.equal(rans.decode_reference(tri_w.cpu(), tri_l.cpu(), tid, tables, lengths), sym)
    # Fused dequantization equals the torch dequantize of the reference symbols (same float32 operations).
    step = torch.rand(tables_n, generator=gen) * 0.3 + 0.01
    kmax = torch.randint(1, 40, (tables_n,), generator=gen).float()
    tid_sm = interleave(tid.to(device).to(torch.int32), lengths)
    coeff, _, _ = decode_interleaved(ref_w.to(device).to(torch.int32), ref_l, tid_sm, tables, lengths, torch.float32,
                                     (step.to(device), kmax.to(device)))  # fmt: skip
    want = dequantize(sym, step[tid], kmax[tid])
    assert torch.equal(deinterleave(coeff, lengths).cpu(), want), "fused dequantization differs"


def _counts_case(device: str, big: bool) -> None:
    """The symbol-count kernel against its reference (exact): rows longer and shorter than a block, full alphabet."""
    gen = torch.Generator().manual_seed(5)
    for rows, n, a in [(3, 10_000, 255), (1, 1, 2), (5, 8_193, 17), (0, 5, 3), (2, 0, 9), (2, 70, 256)] + (
        [(64, 262_144, 255)] if big else []
    ):
        x = torch.randint(0, a, (rows, n), dtype=torch.uint8, generator=gen)
        got = symbol_counts_triton(x.to(device), a).cpu()
        assert torch.equal(got, rans.symbol_counts_reference(x, a)), f"symbol counts differ ({rows}x{n}, {a})"


def stats_inputs(big: bool = False) -> list[torch.Tensor]:
    """Slots ``(G, heads, n, head_dim)`` for the slot-statistics kernels: odd head widths and token counts, one
    token, constant and all-zero channels, channels of very large and very small magnitude, and values on the
    quantizer's half-way points."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(3, 2, 7, 64), (2, 3, 1, 24), (1, 1, 33, 8), (4, 2, 40, 128)] + ([(512, 8, 256, 128)] if big else [])
    out = []
    for g, heads, n, dim in shapes:
        x = torch.randn(g, heads, n, dim, generator=gen) * torch.rand(g, heads, 1, dim, generator=gen) * 4
        x += torch.randn(g, heads, 1, dim, generator=gen) * 3  # per-channel offsets (pre-RoPE keys)
        x[0, 0, :, 0] = 0.0
        x[0, 0, :, 1] = 1.5
        x[-1, -1, :, -1] *= 3e3
        x[-1, 0, :, 0] *= 1e-30
        if n > 2:
            x[0, -1, :, 2] = torch.arange(n, dtype=torch.float32) * 0.5  # half-way points of a step of 1
        out.append(x)
    return out


def _stats_case(device: str, big: bool) -> None:
    """The slot-statistics kernels against their reference (exact fp16 means and steps, exact symbols)."""
    for x in stats_inputs(big):
        got = slot_stats_triton(x.to(device), 0.5)
        want = slot_stats_reference(x, 0.5)
        for name, a, b in zip(want._fields, got, want, strict=True):
            assert torch.equal(a.cpu(), b), f"slot statistics differ ({name}, {tuple(x.shape)})"


def _kv_case(heads: int, head_dim: int, tokens: int, layers: int, device: str) -> None:
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim + tokens)
    kv = [(torch.randn(heads, tokens, head_dim, generator=gen) * torch.rand(1, 1, head_dim, generator=gen) * 4,
           torch.randn(heads, tokens, head_dim, generator=gen)) for _ in range(layers)]  # fmt: skip
    chunks = {}
    for backend, dev in (("torch", "cpu"), ("triton", device)):
        coder = AdaptiveCoder(layers, heads * head_dim, 0.5)
        coder.lane_len, coder.backend, coder.device = 97, backend, torch.device(dev)
        chunks[backend] = coder.encode(kv)
    a, b = chunks["torch"], chunks["triton"]
    assert torch.equal(a.words, b.words) and torch.equal(a.lanes, b.lanes), f"chunk bytes differ {heads}x{head_dim}"
    coder = AdaptiveCoder(layers, heads * head_dim, 0.5)
    coder.lane_len, coder.backend, coder.device = 97, "triton", torch.device(device)
    ref = AdaptiveCoder(layers, heads * head_dim, 0.5)
    ref.lane_len = 97
    got = coder.decode(a, [tokens] * layers, heads, head_dim)
    want = ref.decode(a, [tokens] * layers, heads, head_dim)
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)


def _rope_case(device: str, big: bool) -> None:
    """Fused RoPE vs :func:`kvtool.arch.apply_rope` (computed in float32): within one fp16 rounding step."""
    gen = torch.Generator().manual_seed(7)
    for heads, dim, tokens in [(1, 64, 5), (3, 128, 9), (2, 256, 4)] + ([(8, 128, 2047)] if big else []):
        x = torch.randn(2, tokens, heads, dim, generator=gen).half()
        ang = torch.randn(tokens, dim // 2, generator=gen)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        want = apply_rope(x.float().permute(0, 2, 1, 3), cos[None], sin[None]).permute(0, 2, 1, 3)
        got = rope_triton(x.to(device), cos.to(device), sin.to(device)).cpu().float()
        assert bool(((got - want).abs() <= want.abs() * 2**-10 + 2**-14).all()), f"rope differs {heads}x{dim}"


def _crc_case(kvz, device: str) -> None:  # noqa: ANN001
    """The chunk CRC kernels against their references (blocks of 3 words: pieces cut at odd offsets)."""
    from kvtool.codecs import crc
    from kvtool.codecs.device_decode import read_data

    data = read_data(kvz, pin=False)
    buf = crc.padded_bytes(data.numel(), torch.device(device))
    buf.copy_(data)
    for block in (12, 64):
        plan = crc.plan_chunk_crcs(kvz, torch.device(device), block)
        got = crc.chunk_crcs(buf, plan, "triton")
        assert torch.equal(got.cpu(), crc.chunk_crcs(buf.cpu(), plan, "torch").cpu()), block
        assert torch.equal(got.cpu(), plan.expected.cpu()), block


def _device_decode_case(device: str) -> None:
    """The fused whole-file decode kernel against the CPU pipeline, on tiny llama (per-layer PCA) and gemma3
    (sliding window shorter than the prefix, per-head PCA): adaptive and calibrated files, bit-identical K/V."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from tiny_models import TinyLM, tiny_model

    from kvtool.arch import arch_info
    from kvtool.artifacts import read_artifact, write_artifact
    from kvtool.calibrators.projection import Budget, ProjectionCalibration, fit_projection, projection_artifact
    from kvtool.codecs.chunk_coders import make_chunk_coder
    from kvtool.codecs.decode import _decode_streaming
    from kvtool.codecs.kvz import CodecSettings, KvzFile, encode_prefix, make_coder
    from kvtool.errors import ArtifactError

    class _Tiny:
        def __init__(self, arch: str):
            self.arch, self.model = arch, tiny_model(arch)
            self.info = arch_info(self.model.config)

    from kvtool.codecs.device_decode import decode_file

    gen = torch.Generator().manual_seed(0)
    with TemporaryDirectory() as tmp:
        for arch, granularity in (("llama", "layer"), ("gemma3", "head")):
            tiny = _Tiny(arch)
            lm = TinyLM(tiny)
            cfg = ProjectionCalibration(method="pca", num_seqs=2, seq_len=48, granularity=granularity)
            table = fit_projection(tiny.model, tiny.info, torch.randint(0, 128, (200,), generator=gen), cfg)
            art, _ = projection_artifact({**lm.fingerprint, "arch": tiny.info.to_dict()}, cfg, {}, table,
                                         Budget(bits=3.0))  # fmt: skip
            write_artifact(Path(tmp) / "cal.safetensors", art)
            cal = read_artifact(Path(tmp) / "cal.safetensors")
            ids = torch.randint(0, 128, (150,), generator=gen)
            for settings, c in ((CodecSettings(mode="adaptive", chunk_tokens=32, sink_tokens=2, recent_tokens=3), None),
                                (CodecSettings(mode="adaptive", chunk_tokens=64, lane_symbols=100), None),
                                (CodecSettings(mode="calibrated", level=2, chunk_tokens=32), cal)):  # fmt: skip
                path = Path(tmp) / "x.kvz"
                encode_prefix(lm, ids, settings, path, c)
                ref = _decode_streaming(KvzFile(path), tiny.model, make_chunk_coder(settings, c, tiny.info), None, True)
                coder = make_coder(settings, c, tiny.info)
                _crc_case(KvzFile(path), device)
                got = decode_file(KvzFile(path), tiny.model, coder, torch.device(device), torch.float32, "triton", True)
                # a damaged chunk is refused by the device pipeline too (its CRC), after decoding, before returning
                damaged = bytearray(path.read_bytes())
                damaged[-9] ^= 0x40
                try:
                    decode_file(KvzFile(bytes(damaged)), tiny.model, coder, torch.device(device), torch.float32,
                                "triton")  # fmt: skip
                    raise AssertionError("a damaged file was decoded")
                except ArtifactError as e:
                    assert "corrupted" in str(e), e
                for a, b in zip(got, ref, strict=True):
                    for x, y in ((a.keys, b.keys), (a.keys_pre_rope, b.keys_pre_rope), (a.values, b.values)):
                        x = x.cpu()
                        if device == "cpu":  # the interpreter runs the very fp32 operations of the reference
                            assert torch.equal(x, y), (arch, settings.mode, float((x - y).abs().max()))
                        else:  # on a GPU: FMA contraction and matmul order, a few fp32 roundings per element
                            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max())), (arch,)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--big", action="store_true", help="real sizes (GPU)")
    args = p.parse_args(argv)
    scale = 200 if args.big else 1
    for seed in range(4):
        _random_case(seed, 500 * scale + seed, 5, 17 + seed * 40, 13 * (1 + seed) * (scale if args.big else 1),
                     args.device)  # fmt: skip
    _random_case(9, 3, 1, 2, 1, args.device)  # tiny: one table, binary alphabet, lanes of one symbol
    shapes = [(1, 64, 7), (2, 128, 5), (1, 256, 3)] if not args.big else [(1, 64, 1023), (8, 128, 2047), (2, 256, 511)]
    for heads, dim, tokens in shapes:
        _kv_case(heads, dim, tokens, 2, args.device)
    _rope_case(args.device, big=args.big)
    _counts_case(args.device, big=args.big)
    _stats_case(args.device, big=args.big)
    _device_decode_case(args.device)
    print("kernel checks: all equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
