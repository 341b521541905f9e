"""The strict ``.kvz`` reader, case by case: every hole an outside fuzzer found is closed here by name.

Each edit is tried with its checksums left stale and with all of them recomputed (:mod:`kvz_edit`), so a case
passes only if the reader refuses the *content*, not just a checksum. The structured fuzz suite covers the same
families at scale; these are the regressions to read first.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from cli_helpers import assert_one_line_error, invoke
from kvz_edit import KvzEdit
from tiny_models import TinyLM

from kvtool.artifacts import read_artifact
from kvtool.cli._errors import message_for
from kvtool.codecs.container import SCHEMA_VERSION
from kvtool.codecs.kvz import CodecSettings, KvzFile, decode_kvz, encode_prefix
from kvtool.errors import ArtifactError, InputError

IDS = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def files(tiny_llama: Any, tiny_gemma3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lossless / adaptive .kvz of the tiny llama, and a lossless one of the sliding gemma3."""
    folder = tmp_path_factory.mktemp("kvz")
    out = {}
    for name, tiny, settings in (
        ("lossless", tiny_llama, CodecSettings(mode="lossless", chunk_tokens=64)),
        ("adaptive", tiny_llama, CodecSettings(mode="adaptive", chunk_tokens=64, sink_tokens=2, recent_tokens=3)),
        ("gemma3", tiny_gemma3, CodecSettings(mode="lossless", chunk_tokens=32)),
    ):
        out[name] = folder / f"{name}.kvz"
        encode_prefix(TinyLM(tiny), IDS, settings, out[name])
    return out


def _decode(path: Path, model: Any) -> list[Any]:
    return decode_kvz(KvzFile(path), model, keep_pre_rope=True)


def _model(files: dict[str, Path], name: str, tiny_llama: Any, tiny_gemma3: Any) -> Any:
    return (tiny_gemma3 if name == "gemma3" else tiny_llama).model


def _refused(path: Path, model: Any) -> str:
    """Decode ``path``: it must be refused with exit 3 and a one-line message; returns the message."""
    try:
        _decode(path, model)
    except BaseException as e:  # noqa: BLE001 - the CLI's own error map decides the exit code
        code, message = message_for(e)
        assert code == 3, (type(e).__name__, message)
        assert "\n" not in message
        return message
    raise AssertionError(f"{path.name} decoded")


def _write(tmp_path: Path, edit: KvzEdit, seal: str) -> Path:
    p = tmp_path / f"edited-{seal}.kvz"
    p.write_bytes(edit.to_bytes(seal))
    return p


SEALS = ("stale", "all")


@pytest.mark.parametrize("seal", SEALS)
@pytest.mark.parametrize("tensor", ["raw", "mean", "step"])
@pytest.mark.parametrize("dtype", ["BF16", "I16", "U16"])
def test_same_size_dtype_swaps_are_refused(files, tiny_llama, tmp_path, tensor: str, dtype: str, seal: str) -> None:
    """The CRC covered names and bytes but not dtypes: F16 read as BF16 / I16 / U16 decoded to wrong K/V."""
    e = KvzEdit.read(files["adaptive"])
    e.entries[f"chunk.000000.{tensor}"]["dtype"] = dtype
    assert "format needs F16" in _refused(_write(tmp_path, e, seal), tiny_llama.model) or seal == "stale"


@pytest.mark.parametrize("seal", SEALS)
@pytest.mark.parametrize("shape", [[1, 150], [150, 1], [75, 2]])
def test_reshaped_input_ids_are_refused(files, tiny_llama, tmp_path, shape: list[int], seal: str) -> None:
    e = KvzEdit.read(files["lossless"])
    e.entries["input_ids"]["shape"] = shape
    _refused(_write(tmp_path, e, seal), tiny_llama.model)


def _meta_edit(path: Path, where: str, value: Any) -> KvzEdit:
    e = KvzEdit.read(path)
    *parents, key = where.split(".")
    d: Any = e.meta
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if isinstance(d, list):
        d[int(key)] = value
    else:
        d[key] = value
    return e


FORGED = [
    ("lossless", "extra.cache_dtype", "int32"),
    ("lossless", "extra.cache_dtype", "float128"),
    ("lossless", "extra.cache_dtype", 5),
    ("lossless", "extra.cache_dtype", "bfloat16"),  # 2 bytes an element where the chunks hold 4: sizes differ
    ("lossless", "extra.chunks.1.start", 60),
    ("lossless", "extra.chunks.1.stop", 200),
    ("lossless", "extra.chunks.2.index", 7),
    ("lossless", "extra.layers.0", [1, 150]),
    ("lossless", "schema_version", 0),
    ("lossless", "schema_version", -1),
    ("lossless", "schema_version", SCHEMA_VERSION + 1),  # a version this kvtool does not know
    ("lossless", "method._data.chunk_tokens", 64.0),
    ("lossless", "method._data.chunk_tokens", 1_000_000),
    ("lossless", "inputs.tokens", 3_000_000),
    ("lossless", "inputs.tokens", 149),
    ("lossless", "model.arch.num_layers", 3),
    ("lossless", "model.arch.num_kv_heads", 4),
    ("lossless", "model.arch.sliding_window", 8),
    ("lossless", "model.arch.layer_types", ["sliding_attention", "full_attention"]),
    ("lossless", "inputs.calibration", {"content_digest": "sha256:" + "0" * 64}),
    ("lossless", "method._data.sink_tokens", 1),  # v2 lossless holds positions in order: no sinks to record
    ("lossless", "method._data.recent_tokens", 4),
    ("adaptive", "method._data.mode", "calibrated"),
    ("adaptive", "method._data.level", 10**9),
    ("adaptive", "method._data.sink_tokens", 3),
    ("adaptive", "method._data.recent_tokens", 0),
    ("adaptive", "method._data.lane_symbols", 100),
    ("adaptive", "method._data.quality", True),
    ("gemma3", "model.arch.sliding_window", 16),
    ("gemma3", "extra.layers.0", [0, 150]),
]


@pytest.mark.parametrize("seal", SEALS)
@pytest.mark.parametrize(("name", "where", "value"), FORGED, ids=[f"{n}:{w}={v!r}"[:60] for n, w, v in FORGED])
def test_forged_metadata_is_refused(files, tiny_llama, tiny_gemma3, tmp_path, name, where, value, seal) -> None:
    e = _meta_edit(files[name], where, value)
    _refused(_write(tmp_path, e, seal), _model(files, name, tiny_llama, tiny_gemma3))


def test_checksums_recomputed_on_an_unchanged_file_decode_the_same(files, tiny_llama, tmp_path) -> None:
    """The re-sealing itself changes nothing: the oracle above compares against real refusals."""
    for name in ("lossless", "adaptive"):
        path = _write(tmp_path, KvzEdit.read(files[name]), "all")
        assert path.read_bytes() == files[name].read_bytes()


def test_harmless_settings_decode_identically(files, tiny_llama, tmp_path) -> None:
    """A setting decode never uses (adaptive ``quality``, ``zstd_level``) may change with every checksum
    recomputed: the file then decodes to exactly the same tensors."""
    ref = _decode(files["adaptive"], tiny_llama.model)
    for where, value in (("method._data.quality", 2.0), ("method._data.zstd_level", 9)):
        got = _decode(_write(tmp_path, _meta_edit(files["adaptive"], where, value), "all"), tiny_llama.model)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("seal", ["stale", "crc", "meta", "content"])
def test_any_single_checksum_left_stale_is_caught(files, tiny_llama, tmp_path, seal: str) -> None:
    """sink_tokens changed on a lossless file (it would permute positions): every partial re-seal is refused,
    since the content digest is checked over every byte, after the CRCs and the metadata digest."""
    e = _meta_edit(files["lossless"], "method._data.sink_tokens", 5)
    _refused(_write(tmp_path, e, seal), tiny_llama.model)


@pytest.mark.parametrize("seal", SEALS)
def test_f64_layer_bytes_and_missing_input_ids(files, tiny_llama, tmp_path, seal: str) -> None:
    e = KvzEdit.read(files["lossless"])
    e.entries["chunk.000000.layer_bytes"]["dtype"] = "F64"
    _refused(_write(tmp_path, e, seal), tiny_llama.model)
    e = KvzEdit.read(files["lossless"])
    e.set_raw("input_ids", b"")
    del e.entries["input_ids"]
    _refused(_write(tmp_path, e, seal), tiny_llama.model)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_zstd_bomb_is_stopped_at_the_expected_size(files, tiny_llama, tmp_path) -> None:
    """A lossless chunk whose frame declares 1 GiB: decompression stops one byte past what the geometry allows."""
    e = KvzEdit.read(files["lossless"])
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (1 << 30))
    assert len(bomb) < 64 * 1024
    sizes = e.tensor("chunk.000000.layer_bytes").tolist()
    e.set_raw("chunk.000000.zstd", bomb + bytes(e.raw("chunk.000000.zstd"))[sizes[0] :])
    e.set_raw("chunk.000000.layer_bytes", torch.tensor([len(bomb), *sizes[1:]]).numpy().tobytes())
    before = _rss_mb()
    t0 = time.perf_counter()
    assert "expected" in _refused(_write(tmp_path, e, "all"), tiny_llama.model)
    assert time.perf_counter() - t0 < 5
    assert _rss_mb() - before < 200


def test_huge_token_count_is_refused_before_allocating(files, tiny_llama, tmp_path) -> None:
    """tokens = 3e6 in chunks of 1e6 (meta digest recomputed): refused from the header, without allocating."""
    e = _meta_edit(files["lossless"], "inputs.tokens", 3_000_000)
    e.meta["method"]["_data"]["chunk_tokens"] = 1_000_000
    before = _rss_mb()
    with pytest.raises(ArtifactError):
        KvzFile(_write(tmp_path, e, "all"))
    assert _rss_mb() - before < 100


def test_decoded_size_cap(files, tiny_llama, monkeypatch) -> None:
    monkeypatch.setenv("KVTOOL_MAX_DECODE_BYTES", "1000")
    with pytest.raises(ArtifactError, match="KVTOOL_MAX_DECODE_BYTES"):
        KvzFile(files["lossless"])


@pytest.mark.parametrize("text", ['{"a":' * 100_000 + "1" + "}" * 100_000, '{"a": NaN}', '{"a": Infinity}',
                                  '{"a": 1e400}', '{"a": 1, "a": 2}'])  # fmt: skip
def test_hostile_json_is_an_artifact_error(files, tmp_path, text: str) -> None:
    """Deep nesting, non-finite numbers and duplicate keys in the kvtool JSON: exit 3, one line."""
    e = KvzEdit.read(files["lossless"])
    head = {"__metadata__": {"format": "pt", "kvtool": text}, **e.entries}
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "j.kvz"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(e.data))
    for read in (KvzFile, read_artifact):
        with pytest.raises(ArtifactError):
            read(path)


def test_null_metadata(files, tmp_path) -> None:
    e = KvzEdit.read(files["lossless"])
    blob = json.dumps({"__metadata__": None, **e.entries}).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "n.kvz"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(e.data))
    r = invoke("inspect", path)
    assert_one_line_error(r, 3, "__metadata__")


def _with_timeout(fn: Any, seconds: float = 10.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it has not returned in time (a hang)."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "hung"
    return box[0]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_special_files_are_refused_without_blocking(tmp_path, kind: str) -> None:
    """A FIFO with no writer would block open() forever, /dev/zero would be read forever."""
    if kind == "fifo":
        path = tmp_path / "p.kvz"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero") if kind == "dev-zero" else tmp_path
    for read in (KvzFile, read_artifact):
        err = _with_timeout(lambda r=read: r(path))
        assert isinstance(err, InputError), err
        assert message_for(err)[0] == 1


def test_cli_calibration_fifo_and_dev_zero(files, tiny_model_dir, tmp_path) -> None:
    fifo = tmp_path / "cal.fifo"
    os.mkfifo(fifo)
    for cal in (fifo, Path("/dev/zero")):
        r = invoke("decode", files["lossless"], "-m", tiny_model_dir, "--calibration", cal)
        assert_one_line_error(r, 1, "not a regular file")


def test_recorded_model_id_is_checked_before_loading(files, tmp_path) -> None:
    """decode without -m loads the model the file records: a device path there is refused, not opened."""
    for model_id in ("/dev/zero", "../../etc", "x\ny"):
        e = _meta_edit(files["lossless"], "model.id", model_id)
        path = _write(tmp_path, e, "all")
        r = invoke("decode", path)
        assert r.exit_code in (1, 3), r.stderr
        assert_one_line_error(r, r.exit_code)
        if model_id == "/dev/zero":
            assert_one_line_error(r, 3, "names no loadable model")


def test_usage_errors_are_one_line() -> None:
    import subprocess
    import sys

    for args in (["decode", "--bogus"], ["decode"], ["nosuch"], ["encode", "x", "-o", "y", "--chunk-tokens", "0"]):
        p = subprocess.run([sys.executable, "-c", "from kvtool.cli.app import main; main()", *args],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvtool: error: "), p.stderr
        assert not any(ch in p.stderr for ch in "╭│╰"), p.stderr


def test_decode_to_stdout(files, tiny_model_dir, tmp_path, text_file) -> None:
    """``-o -`` writes the same bytes to stdout as ``-o FILE``; results go to stderr; --json is refused."""
    kvz = tmp_path / "m.kvz"
    r = invoke("encode", text_file, "-m", tiny_model_dir, "--lossless", "--max-tokens", "40", "-o", "-")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    kvz.write_bytes(r.stdout_bytes)
    r2 = invoke("encode", text_file, "-m", tiny_model_dir, "--lossless", "--max-tokens", "40", "-o",
                tmp_path / "f.kvz")  # fmt: skip
    assert r2.exit_code == 0 and (tmp_path / "f.kvz").read_bytes() == kvz.read_bytes()
    out = invoke("decode", kvz, "-o", "-")
    assert out.exit_code == 0, out.stderr
    assert invoke("decode", kvz, "-o", tmp_path / "kv.safetensors").exit_code == 0
    assert out.stdout_bytes == (tmp_path / "kv.safetensors").read_bytes()
    assert_one_line_error(invoke("decode", kvz, "-o", "-", "--json"), 2, "--json")


def test_version_1_files_are_still_read(tiny_llama, tmp_path, monkeypatch) -> None:
    """Files written before the seeded CRCs (schema version 1) decode to the same tensors; there the whole-file
    content digest binds the metadata, so a metadata edit with the chunk CRCs and metadata digest redone is
    still refused."""
    import kvtool.codecs.encode as encode_module

    for mode in ("adaptive", "lossless"):
        settings = CodecSettings(mode=mode, chunk_tokens=64)
        encode_prefix(TinyLM(tiny_llama), IDS, settings, tmp_path / f"v2-{mode}.kvz")
        with monkeypatch.context() as m:
            m.setattr(encode_module, "SCHEMA_VERSION", 1)
            encode_prefix(TinyLM(tiny_llama), IDS, settings, tmp_path / f"v1-{mode}.kvz")
        assert KvzEdit.read(tmp_path / f"v1-{mode}.kvz").meta["schema_version"] == 1
        old, new = (_decode(tmp_path / f"v{v}-{mode}.kvz", tiny_llama.model) for v in (1, 2))
        for a, b in zip(old, new, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # lossless sink_tokens leaves every tensor shape as it is: only the content digest can tell
    e = _meta_edit(tmp_path / "v1-lossless.kvz", "method._data.sink_tokens", 2)
    path = tmp_path / "edited.kvz"
    path.write_bytes(KvzEdit(e.to_bytes("crc")).to_bytes("meta"))
    _refused(path, tiny_llama.model)


def test_a_header_inflated_with_entries_is_refused_before_its_parse(files, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A header with 200,000 forged empty entries is refused from its metadata's bound before the header is
    parsed (a full strict parse of it takes seconds), with the reader's one-line message; with the metadata moved
    after the entries the bound is not read and the full parse refuses it the same way."""
    import kvtool.artifacts as artifacts

    parsed: list[int] = []
    strict = artifacts.strict_json
    monkeypatch.setattr(artifacts, "strict_json", lambda text: parsed.append(len(text)) or strict(text))
    blob = files["adaptive"].read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    extra = {f"t{k:07d}": {"dtype": "U8", "shape": [0], "data_offsets": [len(data), len(data)]} for k in range(200_000)}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    meta_first = {"__metadata__": header["__metadata__"], **tensors, **extra}
    meta_last = {**tensors, **extra, "__metadata__": header["__metadata__"]}
    want = f"malformed \\.kvz metadata \\({len(tensors) + 200_000} tensors, the format has {len(tensors)}\\)"
    for name, order in (("first", meta_first), ("last", meta_last)):
        raw = json.dumps(order, separators=(",", ":")).encode()
        path = tmp_path / f"{name}.kvz"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
        parsed.clear()
        with pytest.raises(ArtifactError, match=want):
            KvzFile(path)
        assert (max(parsed, default=0) > len(raw) // 2) == (name == "last")  # the big header parsed only then


def test_kvz_content_digest_is_tensor_hashed_as_documented(tiny_llama, tmp_path) -> None:
    """docs/artifacts.md, tensor-hashed form (``.kvz`` from version 3): recomputed from the raw file with hashlib
    alone, and ``kvtool inspect``'s check (``read_artifact``) agrees; one changed byte anywhere breaks it."""
    from digest_spec import documented_digest

    from kvtool.artifacts import read_artifact

    path = tmp_path / "a.kvz"
    encode_prefix(TinyLM(tiny_llama), IDS, CodecSettings(mode="adaptive", chunk_tokens=64), path)
    data = path.read_bytes()
    kv, expected, recomputed = documented_digest(data, tensor_hashed=True)
    assert kv["schema_version"] == SCHEMA_VERSION == 3
    assert recomputed == expected
    assert read_artifact(path).content_digest == expected
    damaged = bytearray(data)
    damaged[-3] ^= 0x10
    (tmp_path / "b.kvz").write_bytes(bytes(damaged))
    with pytest.raises(ArtifactError, match="content digest mismatch"):
        read_artifact(tmp_path / "b.kvz")
