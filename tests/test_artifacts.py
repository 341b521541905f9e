"""kvtool artifacts: round trip, determinism, atomic writes and every way a file can be refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from digest_spec import documented_digest

from kvtool import artifacts as A
from kvtool.artifacts import (
    SCHEMAS,
    Artifact,
    check_model,
    describe,
    read_artifact,
    read_header,
    register_schema,
    write_artifact,
)
from kvtool.errors import EXIT_ARTIFACT, ArtifactError, InputError, KvtoolError

FINGERPRINT = {
    "id": "tiny-llama",
    "config_digest": "sha256:" + "c" * 64,
    "weights_digest": "sha256:" + "a" * 64,
    "arch": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 8},
}


def make_artifact(**overrides) -> Artifact:
    g = torch.Generator().manual_seed(0)
    fields = dict(
        schema="kvtool.kv_calibration",
        schema_version=1,
        model=dict(FINGERPRINT),
        inputs={"text_digest": "sha256:" + "1" * 64, "tokens": 4096, "seed": 1234},
        method={"_type": "UniformQuantizer", "_version": 1, "_data": {"bits": 4, "group": 32, "clip": 0.99}},
        extra={"per_layer": [{"layer": i, "mse": 0.5 / (i + 1)} for i in range(4)], "note": "caf\u00e9"},
        tensors={
            "k_scale": torch.rand(4, 2, generator=g),
            "v_scale": torch.rand(4, 2, generator=g).to(torch.bfloat16),
            "k_bits": torch.tensor([[4, 4], [3, 4], [2, 8], [4, 4]], dtype=torch.int8),
            "k_mask": torch.tensor([True, False, True, True]),
            "v_empty": torch.zeros(0, 2),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
        },
    )
    fields.update(overrides)
    return Artifact(**fields)


@pytest.fixture
def written(tmp_path: Path) -> Path:
    path = tmp_path / "calib.safetensors"
    write_artifact(path, make_artifact())
    return path


def header_len(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.strip() == text and text
    return text


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip(written: Path) -> None:
    original = make_artifact()
    got = read_artifact(written, expect_schema="kvtool.kv_calibration", model=FINGERPRINT)
    for name in ("schema", "schema_version", "model", "inputs", "method", "extra"):
        assert getattr(got, name) == getattr(original, name)
    assert got.producer == {"name": "kvtool", "version": A.kvtool_version()}
    assert sorted(got.tensors) == sorted(original.tensors)
    for name, t in original.tensors.items():
        assert got.tensors[name].dtype == t.dtype
        assert torch.equal(got.tensors[name], t), name
    assert got.content_digest.startswith("sha256:") and len(got.content_digest) == 71


def test_write_returns_and_fills_digest(tmp_path: Path) -> None:
    art = make_artifact()
    digest = write_artifact(tmp_path / "a.safetensors", art)
    assert art.content_digest == digest == read_artifact(tmp_path / "a.safetensors").content_digest


def test_deterministic_bytes_and_digest(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.safetensors" for i in range(8)]
    digests = {write_artifact(p, make_artifact()) for p in paths}
    assert len(digests) == 1
    assert len({p.read_bytes() for p in paths}) == 1


def test_digest_depends_on_json_and_tensors(tmp_path: Path) -> None:
    base = write_artifact(tmp_path / "a", make_artifact())
    other_inputs = write_artifact(tmp_path / "b", make_artifact(inputs={"seed": 1}))
    tensors = make_artifact().tensors
    tensors["k_bits"][0, 0] = 5
    other_tensor = write_artifact(tmp_path / "c", make_artifact(tensors=tensors))
    assert len({base, other_inputs, other_tensor}) == 3


def test_file_layout_and_plain_safetensors(written: Path) -> None:
    header = read_header(written)
    meta = header["__metadata__"]
    assert list(meta) == ["format", "kvtool"] and meta["format"] == "pt"
    kv = json.loads(meta["kvtool"])
    assert set(kv) == set(A.FIELDS)
    assert meta["kvtool"] == A.canonical_json(kv)
    assert header_len(written) % 8 == 0
    # plain safetensors reads it: same tensors, same metadata
    with safetensors.safe_open(str(written), framework="pt") as f:
        assert f.metadata() == meta
        for name, t in make_artifact().tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    assert set(safetensors.torch.load_file(str(written))) == set(make_artifact().tensors)


def test_digest_definition_matches_docs(written: Path) -> None:
    """Recompute the digest exactly as docs/artifacts.md spells it out, from the raw file."""
    _, expected, recomputed = documented_digest(written.read_bytes())
    assert recomputed == expected


def test_describe(written: Path) -> None:
    d = describe(read_artifact(written))
    json.dumps(d)
    assert d["schema"] == "kvtool.kv_calibration" and d["schema_version"] == 1
    assert d["tensors"]["k_bits"] == {"dtype": "I8", "shape": [4, 2]}
    assert d["tensors"]["v_scale"] == {"dtype": "BF16", "shape": [4, 2]}
    assert d["tensors"]["scalar"] == {"dtype": "F64", "shape": []}
    assert d["content_digest"].startswith("sha256:")


# ------------------------------------------------------------------------------------------------ atomic writes


def test_write_leaves_no_temp_file(tmp_path: Path) -> None:
    write_artifact(tmp_path / "out.safetensors", make_artifact())
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def _non_contiguous() -> dict[str, torch.Tensor]:
    return {"k_scale": torch.rand(4, 2).t()}


def _shared() -> dict[str, torch.Tensor]:
    base = torch.rand(4, 2)
    return {"k_scale": base, "v_scale": base}


@pytest.mark.parametrize("tensors", [_non_contiguous, _shared], ids=["non-contiguous", "shared-storage"])
def test_refused_tensors_create_nothing(tmp_path: Path, tensors) -> None:
    with pytest.raises(ValueError) as exc:
        write_artifact(tmp_path / "out.safetensors", make_artifact(tensors=tensors()))
    assert_one_line(exc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"schema": "kvtool.nope"},
        {"schema_version": 2},
        {"schema_version": 0},
        {"model": {"id": "x"}},
        {"inputs": {"bad": float("nan")}},
        {"method": {"bad": object()}},
        {"tensors": {"__metadata__": torch.zeros(1)}},
        {"tensors": {"x": [1, 2]}},
        {"tensors": {"x": torch.zeros(2, dtype=torch.complex128)}},
    ],
    ids=repr,
)
def test_invalid_artifacts_are_refused_before_writing(tmp_path: Path, overrides) -> None:
    with pytest.raises(ValueError) as exc:
        write_artifact(tmp_path / "out.safetensors", make_artifact(**overrides))
    assert_one_line(exc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("boom")], ids=repr)
def test_failed_replace_leaves_old_target_and_no_temp(tmp_path: Path, monkeypatch, error) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous content")

    def failing_replace(src, dst):
        raise error

    monkeypatch.setattr(A.os, "replace", failing_replace)
    with pytest.raises((KvtoolError, RuntimeError)) as exc:
        write_artifact(target, make_artifact())
    assert_one_line(exc)
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert target.read_bytes() == b"previous content"


def test_failed_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(KvtoolError) as exc:
        write_artifact(tmp_path / "missing" / "out.safetensors", make_artifact())
    assert "missing" in assert_one_line(exc)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ refused files


@pytest.mark.parametrize(
    "where",
    [
        lambda n, size: 0,
        lambda n, size: 3,
        lambda n, size: 8,
        lambda n, size: 8 + n // 2,
        lambda n, size: 8 + n - 1,
        lambda n, size: 8 + n,
        lambda n, size: 8 + n + (size - 8 - n) // 2,
        lambda n, size: size - 1,
    ],
    ids=["empty", "in-length", "after-length", "mid-header", "header-end", "no-data", "mid-data", "last-byte"],
)
def test_truncated_file(written: Path, where) -> None:
    data = written.read_bytes()
    written.write_bytes(data[: where(header_len(written), len(data))])
    with pytest.raises(ArtifactError) as exc:
        read_artifact(written)
    assert exc.value.exit_code == EXIT_ARTIFACT
    assert str(written) in assert_one_line(exc)
    with pytest.raises(ArtifactError):
        read_header(written)


def test_trailing_bytes(written: Path) -> None:
    written.write_bytes(written.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="unexpected bytes") as exc:
        read_artifact(written)
    assert_one_line(exc)


@pytest.mark.parametrize("offset", [0, 1, 5, -1], ids=["first", "second", "middle", "last"])
def test_flipped_data_byte(written: Path, offset: int) -> None:
    data = bytearray(written.read_bytes())
    start = 8 + header_len(written)
    pos = start + offset if offset >= 0 else len(data) + offset
    data[pos] ^= 0x01
    written.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content digest mismatch: the file is corrupted or was modified") as exc:
        read_artifact(written)
    assert_one_line(exc)


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1, old
    return data.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        (b"1234", b"9234", "content digest mismatch"),  # a value inside the kvtool JSON
        (b"caf\xc3\xa9", b"caf\xc3\xa8", "content digest mismatch"),
        (b'"k_bits"', b'"k_bitz"', "content digest mismatch"),  # a tensor renamed in the header
        (b'"dtype":"F32"', b'"dtype":"I32"', "content digest mismatch"),  # same size, other dtype
        (b'"dtype":"F32"', b'"dtype":"F16"', "does not match"),
        (b'"dtype":"F32"', b'"dtype":"X32"', "unknown dtype"),
        (b'{"__metadata__"', b'["__metadata__"', "not start with"),
        (b'"format":"pt"', b'"format":"pt\xff', "not valid JSON"),
        (b'"format":"pt"', b'"format":"tf"', "__metadata__ must be exactly"),
        (b'"data_offsets":[56,64]', b'"data_offsets":[60,68]', "overlap or leave holes"),
        (b'\\"schema_version\\":1', b'\\"schema_version\\":0', "malformed kvtool metadata"),
        (b'\\"inputs\\"', b'\\"inputz\\"', "unknown fields"),
    ],
    ids=lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v,
)
def test_flipped_header_byte(written: Path, old: bytes, new: bytes, expect: str) -> None:
    data = written.read_bytes()
    n = header_len(written)
    head = _replace_once(data[8 : 8 + n], old, new)
    assert len(head) == n
    written.write_bytes(data[:8] + head + data[8 + n :])
    with pytest.raises(ArtifactError, match=expect) as exc:
        read_artifact(written)
    assert str(written) in assert_one_line(exc)


def test_newer_schema_version(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "future.safetensors"
    with monkeypatch.context() as m:
        m.setitem(SCHEMAS, "kvtool.kv_calibration", 2)
        write_artifact(path, make_artifact(schema_version=2, producer={"name": "kvtool", "version": "9.9.9"}))
    with pytest.raises(ArtifactError) as exc:
        read_artifact(path)
    text = assert_one_line(exc)
    assert "upgrade kvtool" in text and "9.9.9" in text and "version 2" in text
    assert exc.value.exit_code == EXIT_ARTIFACT


def test_unknown_schema(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "other.safetensors"
    with monkeypatch.context() as m:
        m.setattr(A, "SCHEMAS", dict(SCHEMAS))
        register_schema("kvtool.kv_prefix", 1)
        write_artifact(path, make_artifact(schema="kvtool.kv_prefix"))
        assert read_artifact(path).schema == "kvtool.kv_prefix"
    assert "kvtool.kv_prefix" not in A.SCHEMAS
    with pytest.raises(ArtifactError, match="unknown schema 'kvtool.kv_prefix'") as exc:
        read_artifact(path)
    assert_one_line(exc)


def test_register_schema_conflict(monkeypatch) -> None:
    monkeypatch.setattr(A, "SCHEMAS", dict(SCHEMAS))
    register_schema("kvtool.kv_capture", 1)  # same version again is fine
    for name, version in [("kvtool.kv_capture", 2), ("", 1), ("x", 0), ("x", True)]:
        with pytest.raises(ValueError):
            register_schema(name, version)


def test_expect_schema(written: Path) -> None:
    with pytest.raises(ArtifactError, match="is a kvtool.kv_calibration artifact, expected kvtool.kv_capture") as e:
        read_artifact(written, expect_schema="kvtool.kv_capture")
    assert_one_line(e)


@pytest.mark.parametrize(
    "fingerprint",
    [
        {**FINGERPRINT, "config_digest": "sha256:" + "d" * 64},
        {**FINGERPRINT, "id": "other-model", "weights_digest": "sha256:" + "b" * 64},
        {"id": "other-model", "config_digest": "sha256:" + "d" * 64},
    ],
    ids=["config", "weights", "config-only"],
)
def test_wrong_model(written: Path, fingerprint: dict) -> None:
    with pytest.raises(ArtifactError) as exc:
        read_artifact(written, model=fingerprint)
    text = assert_one_line(exc)
    assert f"artifact was made for model tiny-llama (config {FINGERPRINT['config_digest'][:19]}" in text
    assert f"not {fingerprint['id']} (" in text


@pytest.mark.parametrize(
    "fingerprint",
    [
        FINGERPRINT,
        {"id": "renamed", "config_digest": FINGERPRINT["config_digest"]},
        {"weights_digest": FINGERPRINT["weights_digest"]},
    ],
    ids=["full", "config-only", "weights-only"],
)
def test_right_model(written: Path, fingerprint: dict) -> None:
    art = read_artifact(written, model=fingerprint)
    check_model(art, fingerprint)


def test_check_model_needs_a_digest(written: Path) -> None:
    with pytest.raises(ValueError):
        check_model(read_artifact(written), {"id": "tiny-llama"})


def test_plain_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not a kvtool artifact") as exc:
        read_artifact(path)
    assert_one_line(exc)
    header = read_header(path)
    assert header["w"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    assert header["__metadata__"] == {"format": "pt"}


def test_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ArtifactError, match="not a kvtool artifact"):
        read_artifact(path)
    assert "__metadata__" not in read_header(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello",
        b"this is a text file, not a safetensors file\n" * 10,
        (2).to_bytes(8, "little") + b"{}",  # valid but holds nothing: no kvtool metadata (read_header is fine)
        (4).to_bytes(8, "little") + b"[1] ",
        (2).to_bytes(8, "little") + b"{x",
        (16).to_bytes(8, "little") + b'{"a":1}         ',
        (2).to_bytes(8, "little") + b"\xff\xfe",
        (200_000_000).to_bytes(8, "little") + b"{}",
    ],
    ids=["empty", "short", "text", "empty-header", "list", "bad-json", "bad-entry", "not-utf8", "huge-length"],
)
def test_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as exc:
        read_artifact(path)
    assert str(path) in assert_one_line(exc)
    if content == (2).to_bytes(8, "little") + b"{}":
        assert read_header(path) == {}
    else:
        with pytest.raises(ArtifactError) as exc:
            read_header(path)
        assert_one_line(exc)


def test_duplicate_keys_in_header(tmp_path: Path) -> None:
    head = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    head += b" " * (-len(head) % 8)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"\0")
    with pytest.raises(ArtifactError, match="duplicate key"):
        read_header(path)


@pytest.mark.parametrize("reader", [read_artifact, read_header], ids=["read_artifact", "read_header"])
def test_missing_path_is_input_error(tmp_path: Path, reader) -> None:
    with pytest.raises(InputError, match="no such file") as exc:
        reader(tmp_path / "nope.safetensors")
    assert_one_line(exc)
    with pytest.raises(InputError, match="is a directory"):
        reader(tmp_path)
