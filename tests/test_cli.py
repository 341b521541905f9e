"""The CLI end to end on a tiny model folder (random weights, a small BPE tokenizer, both built in code).

Covers the output contract (stdout = result, stderr = the rest, ``--json``, ``-q``) and every documented
failure: one line on stderr, the documented exit code, no output file left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, invoke
from tiny_models import save_model_folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """The tiny Llama (head_dim 16) saved with a 128-token BPE tokenizer trained on Persuasion."""
    return save_model_folder(tmp_path_factory.mktemp("tiny-llama"), text_file)


pytestmark = pytest.mark.usefixtures("isolated_home")  # every test of this module runs with a private home




def test_version() -> None:
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.startswith("kvtool ")


@pytest.fixture
def capture_file(model_dir: Path, text_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "kv.safetensors"
    r = invoke("capture", model_dir, "--text", text_file, "--tokens", 24, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)  # -q prints the primary result only
    return out


def test_capture_then_inspect_json(capture_file: Path) -> None:
    r = invoke("inspect", capture_file, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["schema"] == "kvtool.kv_capture"
    assert info["tensors"]["k_pre_rope"]["shape"] == [2, 2, 24, 16]
    assert [row["tokens"] for row in info["layers"]] == [24, 24]
    assert info["content_digest"].startswith("sha256:")


def test_inspect_human_goes_to_stdout(capture_file: Path) -> None:
    r = invoke("inspect", capture_file)
    assert r.exit_code == 0
    assert "kvtool.kv_capture" in r.stdout and "per layer" in r.stdout
    assert r.stderr == ""


def test_inspect_plain_safetensors(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 3)}, path, metadata={"format": "pt"})
    r = invoke("inspect", path, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["kind"] == "safetensors" and info["tensors"]["w"] == {"dtype": "F32", "shape": [2, 3], "bytes": 24}


def test_capture_is_deterministic(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    paths = [tmp_path / f"kv{i}.safetensors" for i in range(2)]
    for p in paths:
        assert invoke("capture", model_dir, "--text", text_file, "--tokens", 16, "-o", p, "-q").exit_code == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_bench_json(model_dir: Path, text_file: Path) -> None:
    r = invoke(
        "bench", model_dir, "--text", text_file, "--tokens", 64, "--window", 32, "--prefix-len", 32,
        "--cont-len", 8, "--offsets", "0,10", "--configs", "fp16,token-k4v4,kivi-k2v2", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["name"]: row for row in doc["rows"]}
    assert list(rows) == ["original", "fp16", "token-k4v4", "kivi-k2v2"]
    ref = rows["original"]
    assert ref["delta_ppl_pct"] == 0.0 and ref["kl"] == 0.0 and ref["top1"] == 1.0
    # head_dim 16: per-token 4-bit codes + fp16 scale and zero per 16 elements = 4 + 32/16 bits
    assert rows["token-k4v4"]["all_in_bits"] == pytest.approx(6.0)
    assert rows["token-k4v4"]["nominal_bits"] == 4.0
    assert rows["kivi-k2v2"]["kl"] > rows["fp16"]["kl"]


def test_bench_human_table_on_stdout(model_dir: Path, text_file: Path) -> None:
    r = invoke(
        "bench", model_dir, "--text", text_file, "--tokens", 32, "--window", 16, "--no-continuation",
        "--configs", "kivi-k4v4",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "kivi-k4v4" in r.stdout and "ΔPPL" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["bench", "no-such-org/no-such-model"], 1, "not in the local Hugging Face cache"),
        (["bench", "llama-3-8b"], 1, "hf download meta-llama/Meta-Llama-3-8B"),
        (["bench", "./missing-folder"], 1, "unknown model"),
        (["inspect", "/nonexistent/file.safetensors"], 1, "no such file"),
    ],
    ids=["hub-id-not-cached", "alias-not-cached", "missing-folder", "missing-artifact"],
)
def test_runtime_failures(args: list[str], code: int, fragment: str) -> None:
    assert_one_line_error(invoke(*args), code, fragment)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--device", "tpu"], "--device"),
        (["--dtype", "float8"], "--dtype"),
        (["--configs", "kivi-k9v9"], "bits must be in 1..8"),
        (["--configs", "zip-k4v4"], "unknown configuration"),
        (["--json", "-q"], "--json and --quiet"),
        (["--offsets", "a,b"], "--offsets"),
    ],
    ids=["device", "dtype", "bits", "family", "json-and-quiet", "offsets"],
)
def test_usage_errors_exit_2(model_dir: Path, text_file: Path, extra: list[str], fragment: str) -> None:
    r = invoke("bench", model_dir, "--text", text_file, "--tokens", 32, "--window", 16, "--no-continuation", *extra)
    assert_one_line_error(r, 2, fragment)


def test_unknown_flag_is_usage_error() -> None:
    r = invoke("bench", "--no-such-flag")
    assert r.exit_code == 2


def test_missing_text_file(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.safetensors"
    r = invoke("capture", model_dir, "--text", tmp_path / "nope.txt", "-o", out)
    assert_one_line_error(r, 1, "text file not found")
    assert not out.exists()


def test_text_too_short_leaves_no_output(model_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Anne")
    out = tmp_path / "kv.safetensors"
    r = invoke("capture", model_dir, "--text", short, "--tokens", 64, "-o", out)
    assert_one_line_error(r, 1, "fewer than --tokens")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["kvhome", "short.txt"]


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """Same tokenizer, different architecture (tiny Qwen2): an artifact of model_dir must not fit it."""
    import shutil

    from tiny_models import tiny_model

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    tiny_model("qwen2").save_pretrained(folder)
    return folder


def test_hub_id_served_from_local_hf_cache(model_dir: Path, text_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A hub id resolves from ``HF_HUB_CACHE`` (the hub's cache layout, offline), never from the network."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "kv.safetensors"
    r = invoke("capture", "tiny-org/tiny-llama", "--text", text_file, "--tokens", 8, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 8 and out.is_file()


def test_inspect_model_check(capture_file: Path, model_dir: Path, other_model_dir: Path) -> None:
    assert invoke("inspect", capture_file, "--model", model_dir, "-q").exit_code == 0
    assert_one_line_error(invoke("inspect", capture_file, "--model", other_model_dir), 3, "made for model")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_data_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-100] ^= 0x01
    p.write_bytes(bytes(data))


def _newer_schema(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data.replace(b'\\"schema_version\\":1', b'\\"schema_version\\":9', 1))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [(_truncate, ""), (_flip_data_byte, "digest"), (_newer_schema, "upgrade kvtool")],
    ids=["truncated", "flipped-byte", "newer-schema"],
)
def test_bad_artifacts_exit_3(capture_file: Path, damage, fragment: str) -> None:
    damage(capture_file)
    assert_one_line_error(invoke("inspect", capture_file), 3, fragment)


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, in its own process: the error map also covers ``python -m kvtool``."""
    r = subprocess.run(
        [sys.executable, "-m", "kvtool", "inspect", str(tmp_path / "none.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("kvtool: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_model_given_as_in_encode(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """``-m MODEL`` (the spelling of encode/decode) works in capture, calibrate and bench too, with the same result
    as the positional MODEL; giving both is a usage error."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert invoke("capture", model_dir, "--text", text_file, "--tokens", 24, "-o", a, "-q").exit_code == 0
    assert invoke("capture", "-m", model_dir, "--text", text_file, "--tokens", 24, "-o", b, "-q").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    r = invoke("bench", "-m", model_dir, "--text", text_file, "--tokens", 64, "--window", 32, "--prefix-len", 32,
               "--cont-len", 8, "--offsets", "0", "--configs", "fp16", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert [row["name"] for row in json.loads(r.stdout)["rows"]] == ["original", "fp16"]
    assert_one_line_error(invoke("calibrate", model_dir, "-m", model_dir, "--text", text_file), 2, "given twice")


@pytest.mark.parametrize(
    ("entry", "kind", "budget"),
    [
        ("kivi-k4v2-g32", "preset", None),
        ("a.kvcal.safetensors", "artifact", None),
        ("a.kvcal.safetensors@3.25n", "artifact", "3.25b"),
        ("a.pca.kvcal.safetensors@r0.5k", "artifact", "r0.5k"),
        ("kvz:a.pca.kvcal.safetensors@L2", "codec", "L2"),
        ("kvz:a.pca.kvcal.safetensors", "codec", "1b"),
        ("kvz:q0.5", "codec", None),
        ("zstd-fp16", "peer", None),
    ],
)
def test_configs_grammar(entry: str, kind: str, budget: str | None) -> None:
    """One parser for every --configs entry (kvtool.eval.configs), budgets through the one Budget parser."""
    from kvtool.errors import UsageError
    from kvtool.eval.configs import parse_config

    e = parse_config(entry)
    assert e.kind == kind and (e.budget.label() if e.budget else None) == budget
    for bad in ("a.kvcal.safetensors@bogus", "kvz:qx", "kvz:a.pca.kvcal.safetensors@r0.5"):
        with pytest.raises(UsageError):
            parse_config(bad)


def test_decode_refuses_another_tokenizer(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """A .kvz records its tokenizer's digest: the same model with another vocabulary is refused (exit 3), since
    continuing the cache would feed ids that mean other words."""
    from kvtool.texts import book

    other_text = tmp_path / "other.txt"
    other_text.write_text(book("emma")[:20000])  # another text: another vocabulary, the same random weights
    other = save_model_folder(tmp_path / "other-tokenizer", other_text)
    kvz = tmp_path / "x.kvz"
    r = invoke("encode", text_file, "-m", model_dir, "--max-tokens", 40, "--lossless", "-o", kvz, "-q")
    assert r.exit_code == 0, r.stderr
    assert_one_line_error(invoke("decode", kvz, "-m", other), 3, "tokenizer")
