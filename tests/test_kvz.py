"""The ``.kvz`` codec end to end: every mode on every tiny architecture, the CLI (encode, decode -o, --generate),
byte-identical output, ``load_cache`` + generate, and every damaged-input path (exit 3, one line, naming the chunk),
plus a mutation fuzz loop."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from tiny_models import TinyLM

from kvtool.artifacts import read_artifact
from kvtool.capture import capture_kv
from kvtool.codecs.ecsq import codec_levels
from kvtool.codecs.kvz import CodecSettings, KvzFile, decode_kvz, encode_prefix, load_cache
from kvtool.errors import ArtifactError, InputError
from kvtool.models import cache_kwargs

IDS = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(
    "settings",
    [
        CodecSettings(mode="lossless", chunk_tokens=64),
        CodecSettings(mode="adaptive", quality=0.05, chunk_tokens=64, sink_tokens=2, recent_tokens=5),
        CodecSettings(mode="adaptive", quality=1.0, chunk_tokens=1000, sink_tokens=0),
    ],
    ids=["lossless", "adaptive-fine", "adaptive-coarse-one-chunk"],
)
def test_round_trip_every_architecture(tiny, settings: CodecSettings, tmp_path: Path) -> None:
    lm = TinyLM(tiny)
    path = tmp_path / "x.kvz"
    info = encode_prefix(lm, IDS, settings, path)
    assert info["chunks"] == -(-150 // settings.chunk_tokens)
    cap = capture_kv(tiny.model, IDS)
    layers = decode_kvz(KvzFile(path), tiny.model)
    for d, c in zip(layers, cap.layers, strict=True):
        assert torch.equal(d.positions, c.positions)
        if settings.mode == "lossless":
            assert torch.equal(d.keys, c.keys) and torch.equal(d.values, c.values)
        else:
            bound = 0.03 if settings.quality < 0.1 else 0.7  # half a step of quality·σ, relative to the peak
            assert _max_rel(d.keys, c.keys) < bound and _max_rel(d.values, c.values) < bound
    # Identical inputs give identical bytes.
    again = tmp_path / "y.kvz"
    encode_prefix(lm, IDS, settings, again)
    assert again.read_bytes() == path.read_bytes()


def test_raw_tokens_are_fp16_exact(tiny_llama, tmp_path: Path) -> None:
    lm = TinyLM(tiny_llama)
    s = CodecSettings(mode="adaptive", quality=2.0, chunk_tokens=32, sink_tokens=3, recent_tokens=4)
    encode_prefix(lm, IDS, s, tmp_path / "x.kvz")
    cap = capture_kv(tiny_llama.model, IDS)
    layers = decode_kvz(KvzFile(tmp_path / "x.kvz"), tiny_llama.model)
    for d, c in zip(layers, cap.layers, strict=True):
        for sl in (slice(0, 3), slice(-4, None)):
            assert torch.allclose(d.values[:, :, sl], c.values[:, :, sl].half().float(), atol=0, rtol=0)
            assert torch.allclose(d.keys[:, :, sl], c.keys[:, :, sl], atol=2e-3, rtol=1e-2)


def test_load_cache_continues_generation(tiny_llama, tmp_path: Path) -> None:
    """Greedy generation from a lossless .kvz equals generation after a fresh prefill."""
    lm = TinyLM(tiny_llama)
    encode_prefix(lm, IDS, CodecSettings(mode="lossless"), tmp_path / "x.kvz")
    cache, ids = load_cache(tmp_path / "x.kvz", tiny_llama.model)
    assert torch.equal(ids, IDS)
    new = torch.tensor([5, 6, 7])
    full = torch.cat([ids, new])[None]
    with torch.no_grad():
        got = tiny_llama.model.generate(full, **cache_kwargs(tiny_llama.model, cache), max_new_tokens=8,
                                        do_sample=False, attention_mask=torch.ones_like(full))  # fmt: skip
        ref = tiny_llama.model.generate(full, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(full))
    assert torch.equal(got, ref)


def test_other_model_is_refused(tiny_llama, tiny_qwen2, tmp_path: Path) -> None:
    encode_prefix(TinyLM(tiny_llama), IDS, CodecSettings(chunk_tokens=64), tmp_path / "x.kvz")
    with pytest.raises(ArtifactError, match="not"):
        load_cache(tmp_path / "x.kvz", tiny_qwen2.model)


# -- damaged files -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_kvz(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kvz") / "small.kvz"
    encode_prefix(TinyLM(tiny_llama), IDS[:40], CodecSettings(chunk_tokens=16, quality=0.5, lane_symbols=64), path)
    return path


def _decode(path: Path, model: Any) -> list[Any]:
    return decode_kvz(KvzFile(path), model)


def test_flipped_byte_in_a_chunk_names_the_chunk(small_kvz: Path, tiny_llama, tmp_path: Path) -> None:
    kvz = KvzFile(small_kvz)
    begin, end = kvz._header["chunk.000001.words"]["data_offsets"]
    data = bytearray(small_kvz.read_bytes())
    data[kvz._data_start + begin + 3] ^= 0x10
    bad = tmp_path / "bad.kvz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="chunk 1 is corrupted"):
        _decode(bad, tiny_llama.model)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_file(small_kvz: Path, tiny_llama, tmp_path: Path, keep: int) -> None:
    data = small_kvz.read_bytes()
    bad = tmp_path / "bad.kvz"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-5])
    with pytest.raises(ArtifactError):
        _decode(bad, tiny_llama.model)


def test_fuzz_mutations(small_kvz: Path, tiny_llama, tmp_path: Path) -> None:
    """3,000 random mutations (byte flips, runs of random bytes, truncations, insertions) anywhere in the file:
    every one is either refused with an ArtifactError or decodes to exactly the original tensors."""
    data = small_kvz.read_bytes()
    reference = _decode(small_kvz, tiny_llama.model)
    rng = random.Random(0)
    bad = tmp_path / "m.kvz"
    outcomes = {"refused": 0, "same": 0}
    for _ in range(3000):
        b = bytearray(data)
        kind = rng.random()
        if kind < 0.6:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind < 0.8:
            i = rng.randrange(len(b))
            b[i : i + 8] = bytes(rng.randrange(256) for _ in range(8))
        elif kind < 0.9:
            b = b[: rng.randrange(len(b))]
        else:
            i = rng.randrange(len(b))
            b[i:i] = bytes([rng.randrange(256)])
        bad.write_bytes(bytes(b))
        try:
            got = _decode(bad, tiny_llama.model)
        except (ArtifactError, InputError):
            outcomes["refused"] += 1
            continue
        for g, r in zip(got, reference, strict=True):  # undetected only if harmless (e.g. header padding)
            assert torch.equal(g.keys, r.keys) and torch.equal(g.values, r.values)
        outcomes["same"] += 1
    assert outcomes["refused"] > 2500


# -- the CLI -----------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("isolated_home")  # every test of this module runs with a private home




@pytest.fixture(scope="module")
def pca_artifact(tiny_model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pca") / "pca.kvcal.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVTOOL_HOME", str(path.parent / "kvhome"))
        r = invoke("calibrate", tiny_model_dir, "--text", text_file, "--num-seqs", 2, "--seq-len", 64,
                   "--method", "pca", "-o", path, "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return path


def test_cli_calibrated_encode_decode_generate(
    pca_artifact: Path, tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ctx.kvz"
    base = ("encode", text_file, "-m", tiny_model_dir, "--max-tokens", 100, "--chunk-tokens", 32)
    r = invoke(*base, "-o", out, "--calibration", pca_artifact, "--bits", 3, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["chunks"] == 4 and info["mode"] == "calibrated" and info["bits_per_element"] > 0
    r2 = invoke(*base, "-o", tmp_path / "again.kvz", "--calibration", pca_artifact, "--bits", 3, "-q")
    assert r2.exit_code == 0 and (tmp_path / "again.kvz").read_bytes() == out.read_bytes()
    kv = tmp_path / "kv.safetensors"
    d = invoke("decode", out, "-m", tiny_model_dir, "--calibration", pca_artifact, "-o", kv, "--json")
    assert d.exit_code == 0, d.stderr
    cap = read_artifact(kv)
    assert cap.schema == "kvtool.kv_capture" and cap.tensors["k"].shape[2] == 100
    g = invoke("decode", out, "-m", tiny_model_dir, "--calibration", pca_artifact, "--generate", "Anne",
               "--max-new-tokens", 5, "--json")  # fmt: skip
    assert g.exit_code == 0, g.stderr
    assert isinstance(json.loads(g.stdout)["generated"], str)
    # Without the calibration, or with another artifact: exit 3, one line.
    r3 = invoke("decode", out, "-m", tiny_model_dir)
    assert_one_line_error(r3, 3, "--calibration")
    other = tmp_path / "other.kvcal.safetensors"
    r4 = invoke("calibrate", "--resolve", pca_artifact, "--target-bits", 3, "-o", other, "-q")
    assert r4.exit_code == 0, r4.stderr
    r5 = invoke("decode", out, "-m", tiny_model_dir, "--calibration", other)
    assert_one_line_error(r5, 3, "coded with calibration")


def test_cli_adaptive_and_lossless(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    for flags, name in ((("--quality", 0.3), "a.kvz"), (("--lossless",), "l.kvz")):
        r = invoke("encode", text_file, "-m", tiny_model_dir, "--max-tokens", 60, "-o", tmp_path / name, *flags, "-q")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.strip() == str(tmp_path / name)
        d = invoke("decode", tmp_path / name, "-m", tiny_model_dir, "--json")
        assert d.exit_code == 0, d.stderr
        assert json.loads(d.stdout)["tokens"] == 60


def test_cli_errors(small_kvz: Path, tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.kvz"
    r = invoke("encode", text_file, "-m", tiny_model_dir, "-o", out, "--bits", 2)
    assert_one_line_error(r, 2, "--calibration")
    assert not out.exists()
    r = invoke("encode", tmp_path / "missing.txt", "-m", tiny_model_dir, "-o", out)
    assert_one_line_error(r, 1, "missing.txt")
    assert not out.exists()
    assert_one_line_error(invoke("decode", tmp_path / "nothing.kvz"), 1, "nothing.kvz", "no such file")
    # A .kvz of another model (the tiny Llama of conftest has different weights than the saved folder's).
    r = invoke("decode", small_kvz, "-m", tiny_model_dir)
    assert_one_line_error(r, 3, "is for model")
    bad = tmp_path / "trunc.kvz"
    bad.write_bytes(small_kvz.read_bytes()[:-9])
    assert_one_line_error(invoke("decode", bad, "-m", tiny_model_dir), 3, "")


def test_bench_codec_rows_and_plot(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "rd.png"
    r = invoke("bench", tiny_model_dir, "--text", text_file, "--tokens", 64, "--window", 32, "--prefix-len", 48,
               "--cont-len", 8, "--offsets", 0, "--configs",
               "kivi-k4v4,kvz:q0.5,kvz:lossless,zstd-fp16,cachegen,lmcache-kvtool@8.0,lmcache-fp8",
               "--json", "--plot", png)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["name"]: row for row in doc["rows"]}
    assert rows["kivi-k4v4"]["bytes_per_token"] is None and rows["kivi-k4v4"]["ppl"] is not None
    lossless = rows["kvz:lossless"]
    assert lossless["ppl"] is None and lossless["kl"] == pytest.approx(0, abs=1e-9) and lossless["top1"] == 1.0
    assert lossless["all_in_bits"] > 16  # fp32 cache of random weights: incompressible, plus the container
    q = rows["kvz:q0.5"]
    assert 0 < q["all_in_bits"] < lossless["all_in_bits"] and q["encode_mb_s"] > 0 and q["decode_mb_s"] > 0
    assert rows["zstd-fp16"]["all_in_bits"] < lossless["all_in_bits"]
    assert ("cachegen" in rows) != ("cachegen" in doc["skipped"])
    assert rows["lmcache-fp8"]["all_in_bits"] == 8.0 and rows["lmcache-fp8"]["kl"] > 0  # one byte per element
    record = rows["lmcache-kvtool@8.0"]  # fixed-size records: exactly 8 bits per element (48-token chunks)
    assert record["all_in_bits"] == pytest.approx(8.0, abs=0.01) and record["kl"] < rows["lmcache-fp8"]["kl"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = invoke("bench", tiny_model_dir, "--text", text_file, "--tokens", 64, "--configs", "kvz:q0.5",
                 "--no-continuation")  # fmt: skip
    assert_one_line_error(bad, 2, "continuation")


@pytest.mark.parametrize("quality", [0.3, 2.0])
def test_batched_chunks_give_the_same_bytes(tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            quality: float) -> None:  # fmt: skip
    """Chunks entropy-coded together (lanes in one pass) are byte-identical to chunks coded one at a time."""
    import kvtool.codecs.decode as decode_mod
    import kvtool.codecs.encode as encode_mod

    s = CodecSettings(mode="adaptive", quality=quality, chunk_tokens=16, lane_symbols=50)
    encode_prefix(TinyLM(tiny_llama), IDS, s, tmp_path / "batched.kvz")
    monkeypatch.setattr(encode_mod, "BATCH_CHUNKS", 1)
    monkeypatch.setattr(decode_mod, "BATCH_CHUNKS", 1)
    encode_prefix(TinyLM(tiny_llama), IDS, s, tmp_path / "single.kvz")
    assert (tmp_path / "batched.kvz").read_bytes() == (tmp_path / "single.kvz").read_bytes()
    one = _decode(tmp_path / "batched.kvz", tiny_llama.model)
    monkeypatch.setattr(decode_mod, "BATCH_CHUNKS", 8)
    many = _decode(tmp_path / "batched.kvz", tiny_llama.model)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(one, many, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_give_the_same_file(tiny_llama, tmp_path: Path) -> None:
    """On a CUDA model, the Triton coder writes the same .kvz as the torch reference and decodes it identically."""
    import copy

    lm = TinyLM(tiny_llama)
    lm.model = copy.deepcopy(tiny_llama.model).cuda()
    s = CodecSettings(mode="adaptive", quality=0.3, chunk_tokens=32, lane_symbols=100)
    encode_prefix(lm, IDS, s, tmp_path / "t.kvz", backend="torch")
    encode_prefix(lm, IDS, s, tmp_path / "g.kvz", backend="triton")
    assert (tmp_path / "t.kvz").read_bytes() == (tmp_path / "g.kvz").read_bytes()
    a = decode_kvz(KvzFile(tmp_path / "g.kvz"), lm.model, backend="triton", device="cuda")
    b = decode_kvz(KvzFile(tmp_path / "g.kvz"), lm.model, backend="torch")
    # the device pipeline against the CPU one: FMA contraction, a few fp32 roundings per element (docs/kvz.md)
    for x, y in zip(a, b, strict=True):
        for u, v in ((x.keys, y.keys), (x.values, y.values)):
            assert torch.allclose(u.cpu(), v, rtol=1e-5, atol=1e-5 * float(v.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetched_decode(tiny_llama, tmp_path: Path) -> None:
    """``load_cache`` and ``decode_kv`` on a CUDA model move the data section while the header is parsed
    (``Prefetch``): the same K/V as the CPU decode from a path and from pinned bytes; a damaged, a truncated and a
    header-length-forged file are refused with the reader's one-line errors, and nothing stays in flight."""
    import copy

    import kvtool
    from kvtool.errors import ArtifactError

    model = copy.deepcopy(tiny_llama.model).cuda()
    s = CodecSettings(mode="adaptive", quality=0.3, chunk_tokens=32, sink_tokens=2, recent_tokens=3)
    path = tmp_path / "p.kvz"
    encode_prefix(TinyLM(tiny_llama), IDS, s, path)
    ref = decode_kvz(KvzFile(path), tiny_llama.model)
    cache, _ = kvtool.load_cache(path, model)
    pinned = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).pin_memory()
    for got in ([(layer.keys, layer.values) for layer in cache.layers], kvtool.decode_kv(pinned, model),
                kvtool.decode_kv(str(path), model)):  # fmt: skip
        for (k, v), r in zip(got, ref, strict=True):
            assert torch.allclose(k.float().cpu(), r.keys, rtol=1e-2, atol=1e-2)
            assert torch.allclose(v.float().cpu(), r.values, rtol=1e-2, atol=1e-2)
    blob = path.read_bytes()
    damaged = bytearray(blob)
    damaged[-9] ^= 0x40
    (tmp_path / "d.kvz").write_bytes(damaged)
    (tmp_path / "t.kvz").write_bytes(blob[:-100])
    forged = bytearray(blob)
    forged[:8] = (len(blob) * 4).to_bytes(8, "little")
    (tmp_path / "f.kvz").write_bytes(forged)
    for name, why in (("d", "corrupted"), ("t", "truncated"), ("f", "header")):
        with pytest.raises(ArtifactError, match=why):
            kvtool.load_cache(tmp_path / f"{name}.kvz", model)
    with pytest.raises(ArtifactError, match="corrupted"):
        kvtool.decode_kv(torch.frombuffer(damaged, dtype=torch.uint8).pin_memory(), model)


def test_geometry_split_and_segments_follow_the_definition() -> None:
    """``split`` (coded / raw positions of a layer in a chunk) and ``segments`` (their counts, by interval
    arithmetic) agree with the definition: raw = sink or recent position, over every small geometry."""
    import itertools

    from kvtool.arch import ArchInfo
    from kvtool.codecs.kvz import Geometry

    arch = ArchInfo("llama", 2, 1, 1, 4, 4, 10, ("full_attention", "sliding_attention"), 5, {})
    for t, ct, s, r in itertools.product([1, 3, 7, 20], [1, 3, 8], [0, 1, 4, 30], [0, 2, 9, 30]):
        g = Geometry(arch, t, CodecSettings(chunk_tokens=ct, sink_tokens=s, recent_tokens=r))
        seg = g.segments()
        for c in range(g.num_chunks):
            for layer in range(2):
                lo, hi = g.layer_range(layer)
                a, b = g.chunk_span(c)
                pos = range(max(a, lo), min(b, hi))
                want = ([p for p in pos if not g.raw(p)], [p for p in pos if g.raw(p)])
                assert g.split(layer, c) == want
                assert (int(seg.coded[c * 2 + layer]), int(seg.raw[c * 2 + layer])) == tuple(map(len, want))


def test_calibrated_round_trip_every_architecture(tiny, tmp_path: Path) -> None:
    """The codec-mode matrix's calibrated column (lossless and adaptive are above): a PCA calibration of each tiny
    architecture, written and read back, codes the prefix at its richest level; the decode stays within its steps,
    and the same inputs give the same bytes."""
    from kvtool.artifacts import write_artifact
    from kvtool.budget import Budget
    from kvtool.calibrators.projection import ProjectionCalibration, fit_projection, projection_artifact

    cfg = ProjectionCalibration(method="pca", num_seqs=2, seq_len=48)
    text_ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(7))
    table = fit_projection(tiny.model, tiny.info, text_ids, cfg)
    lm = TinyLM(tiny)
    art, _ = projection_artifact({**lm.fingerprint, "arch": tiny.info.to_dict()}, cfg, {}, table, Budget(bits=4.0))
    write_artifact(tmp_path / "cal.safetensors", art)
    cal = read_artifact(tmp_path / "cal.safetensors")
    settings = CodecSettings(mode="calibrated", level=-1, chunk_tokens=64)
    encode_prefix(lm, IDS, settings, tmp_path / "x.kvz", cal)
    layers = decode_kvz(KvzFile(tmp_path / "x.kvz"), tiny.model, cal)
    cap = capture_kv(tiny.model, IDS)
    for d, c in zip(layers, cap.layers, strict=True):
        assert torch.equal(d.positions, c.positions)
        assert _max_rel(d.keys, c.keys) < 0.5 and _max_rel(d.values, c.values) < 0.5
    encode_prefix(lm, IDS, settings, tmp_path / "y.kvz", cal)
    assert (tmp_path / "y.kvz").read_bytes() == (tmp_path / "x.kvz").read_bytes()


def test_cli_encode_quality_target(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """``--max-kl``: the cheapest rate whose KL on the prompt's held-out last tokens meets the target (bisection over
    the rates, each probe a real encode + decode), reported; nothing meets 0 (exit 4, no file); not with a fixed
    rate or --lossless (exit 2)."""
    out = tmp_path / "q.kvz"
    base = ("encode", text_file, "-m", tiny_model_dir, "--max-tokens", 120, "-o", out, "--probe-tokens", 32)
    r = invoke(*base, "--max-kl", 1e6, "--json")
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["quality_target"]
    assert q["chosen"]["quality"] == 3.0 and q["chosen"]["meets"]  # everything passes: the coarsest step
    assert len(q["tried"]) <= 5 and q["probe_tokens"] == 32
    r = invoke(*base, "--max-kl", 0.02, "--json", "--overwrite")
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["quality_target"]
    chosen, tried = q["chosen"], sorted(q["tried"], key=lambda t: -t["quality"])
    assert chosen["kl"] <= 0.02
    coarser = [t for t in tried if t["quality"] > chosen["quality"]]
    assert coarser and not coarser[-1]["meets"]  # the next coarser step measured fails: cheapest passing rate
    out.unlink()
    assert_one_line_error(invoke(*base, "--max-kl", 0), 4, "no rate meets")
    assert not out.exists()
    assert_one_line_error(invoke(*base, "--max-kl", 0.1, "--lossless"), 2, "lossless")
    assert_one_line_error(invoke(*base, "--max-kl", -1), 2, "max-kl")


def test_cli_encode_quality_target_calibrated(pca_artifact: Path, tiny_model_dir: Path, text_file: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    """With an artifact, --max-kl chooses among its codec levels (no --bits default applies); an artifact without
    codec levels is refused (exit 3), not indexed into."""
    out = tmp_path / "q.kvz"
    base = ("encode", text_file, "-m", tiny_model_dir, "--max-tokens", 120, "-o", out, "--probe-tokens", 32)
    r = invoke(*base, "--calibration", pca_artifact, "--max-kl", 1e6, "--json")
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["quality_target"]
    levels = codec_levels(read_artifact(pca_artifact).tensors)
    assert q["chosen"]["level"] == min(range(len(levels)), key=lambda i: levels[i].expected_bits)  # the cheapest
    no_levels = tmp_path / "engine.kvcal.safetensors"
    r = invoke("calibrate", tiny_model_dir, "--text", text_file, "--num-seqs", 1, "--seq-len", 32, "--kv-dtype",
               "fp8", "-o", no_levels, "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert_one_line_error(invoke(*base, "--calibration", no_levels, "--max-kl", 0.1, "--overwrite"), 3,
                          "no codec levels")  # fmt: skip
