"""Engine formats of an engine calibration, each read back by its consumer's own code or, where that cannot be
imported on a CPU machine (vLLM), checked against the rules its loader applies, citing the file.

Consumers installed by ``make install`` with ``--no-deps``: compressed-tensors 0.20.1 (its pydantic
``QuantizationConfig`` and its ``fake_quantize``), nvidia-modelopt 0.47.0 (``convert_hf_quant_config_format``, a
standard-library module loaded by path: the package itself imports a GPU stack). vLLM 0.34.0 rules re-checked:
``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` and ``create_weights``
(model_executor/layers/quantization/compressed_tensors/compressed_tensors.py), ``maybe_remap_kv_scale_name``
(model_executor/model_loader/weight_utils.py), ``kv_cache_dtype_skip_layers`` (config/cache.py; the flag is
``nargs="+"`` of strings, engine/arg_utils.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from safetensors.torch import load_file

from kvtool.arch import ArchInfo
from kvtool.artifacts import read_artifact, write_artifact
from kvtool.calibration import calibration_artifact, transform_of
from kvtool.calibrators.base import calibrate, calibrator
from kvtool.calibrators.engine_kv import EngineKVCalibration
from kvtool.errors import UsageError
from kvtool.exports import ScaleSites, export
from kvtool.exports.engines import INDEX_PATCH, SCALES_FILE, scale_sites
from kvtool.models import load_model
from kvtool.quantizers import Fp8Quantizer, Nvfp4Quantizer
from kvtool.quantizers import UniformQuantizer as U
from kvtool.transforms import KVTransform

SMALL = {"num_seqs": 2, "seq_len": 48, "seed": 0}


# -- the consumers' own code and rules -----------------------------------------------------------------------------


def modelopt_converter() -> Any:
    """ModelOpt's ``convert_hf_quant_config_format``, from the installed wheel's file."""
    dist = importlib.metadata.distribution("nvidia-modelopt")
    path = next(f for f in dist.files or [] if str(f).endswith("torch/export/convert_hf_config.py"))
    spec = importlib.util.spec_from_file_location("modelopt_convert_hf_config", dist.locate_file(path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert_hf_quant_config_format


def vllm_validate_kv_cache_scheme(scheme: dict[str, Any]) -> None:
    """vLLM 0.34.0 ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme``: 8-bit float, a strategy of tensor or
    attn_head (the key must be there), symmetric."""
    assert scheme["type"] == "float" and scheme["num_bits"] == 8
    assert scheme["strategy"] in ("tensor", "attn_head")
    assert scheme.get("symmetric")


def vllm_remap(name: str) -> str:
    """vLLM 0.34.0 ``maybe_remap_kv_scale_name`` for the names these exports write (ModelOpt's k_proj.k_scale, then
    the default ``.k_scale`` rule compressed-tensors checkpoints use)."""
    modelopt = re.sub(r"\.self_attn\.([kv])_proj\.([kv])_scale$", r".self_attn.attn.\2_scale", name)
    if modelopt != name:
        return modelopt
    return re.sub(r"\.([qkv])_scale$", r".attn.\1_scale", name)


def vllm_skip_layer_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's two cache flags as its argument parser builds them (``list[str]`` fields become ``nargs="+"``)."""
    p = argparse.ArgumentParser()
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "nvfp4"])
    p.add_argument("--kv-cache-dtype-skip-layers", nargs="+", type=str, default=[])
    return p.parse_args(argv)


# -- artifacts ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine_arts(lm: Any, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Engine calibrations of the tiny Llama (a real model folder): FP8 per tensor and per head with one skipped
    layer, NVFP4, and the mixed search."""
    folder = tmp_path_factory.mktemp("engine")
    settings = {
        "fp8-tensor": {"kv_dtype": "fp8", "skip_budget": 1},
        "fp8-head": {"kv_dtype": "fp8", "granularity": "head", "observer": "mse"},
        "nvfp4": {"kv_dtype": "nvfp4"},
        "mixed": {"kv_dtype": "mixed", "target_bits": 7.0, "observer": "mse"},
        "mixed-kl": {"kv_dtype": "mixed", "target_bits": 7.0, "observer": "mse", "sensitivity": "kl"},
    }
    out = {}
    for name, s in settings.items():
        art = calibrate(lm, calibrator("engine", **SMALL, **s), text=str(text_file))[0]
        out[name] = folder / f"{name}.kvcal.safetensors"
        write_artifact(out[name], art)
    return out


def _export_dir(art: Path, fmt: str, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / fmt
    r = invoke("export", art, "--to", fmt, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"{out}\n"
    return out, r.stderr


# -- compressed-tensors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8-tensor", "fp8-head"])
def test_compressed_tensors_is_read_by_compressed_tensors_and_vllm_rules(
    name: str, engine_arts: dict[str, Path], lm: Any, tmp_path: Path
) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out, stderr = _export_dir(engine_arts[name], "compressed-tensors", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config_patch.json", SCALES_FILE, INDEX_PATCH])
    patch = json.loads((out / "config_patch.json").read_text())
    config = QuantizationConfig.model_validate(patch["quantization_config"])  # the consumer's own parser
    scheme = config.kv_cache_scheme
    assert scheme is not None and scheme.type == "float" and scheme.num_bits == 8 and not scheme.dynamic
    vllm_validate_kv_cache_scheme(patch["quantization_config"]["kv_cache_scheme"])
    head = name == "fp8-head"
    assert scheme.strategy == ("attn_head" if head else "tensor")

    scales = load_file(out / SCALES_FILE)
    heads = lm.arch.num_kv_heads
    modules = {n for n, _ in lm.model.named_modules()}
    assert len(scales) == 2 * lm.arch.num_layers  # every layer, skipped ones with their calibrated amax scale
    transform = transform_of(read_artifact(engine_arts[name]))
    args = QuantizationArgs(**patch["quantization_config"]["kv_cache_scheme"])
    x = torch.randn(1, heads, 40, lm.arch.head_dim, generator=torch.Generator().manual_seed(0)) * 3
    for layer in range(lm.arch.num_layers):
        for kind, t in (("k", transform.keys[layer]), ("v", transform.values[layer])):
            key = f"model.layers.{layer}.self_attn.{kind}_scale"
            s = scales[key]
            assert s.dtype == torch.float32 and tuple(s.shape) == ((heads, 1, 1) if head else (1,))
            assert key.rsplit(".", 1)[0] in modules  # the attention module the scale belongs to
            assert vllm_remap(key) == f"model.layers.{layer}.self_attn.attn.{kind}_scale"
            if t is None:
                continue
            # compressed-tensors' own fake quantization with the exported scale == kvtool's FP8, bit for bit
            ct = fake_quantize(x, s, torch.zeros_like(s), args)
            assert torch.equal(ct, t.apply(x))
    index = json.loads((out / INDEX_PATCH).read_text())
    assert index == {"weight_map": {k: SCALES_FILE for k in sorted(scales)}}
    if name == "fp8-tensor":  # one layer kept in the model dtype: the flag that tells vLLM so, in the warning
        skipped = read_artifact(engine_arts[name]).extra["engine"]["skip_layers"]
        assert len(skipped) == 1
        assert f"--kv-cache-dtype fp8 --kv-cache-dtype-skip-layers {skipped[0]}" in stderr


def test_compressed_tensors_refuses_nvfp4_and_needs_a_folder(engine_arts: dict[str, Path], tmp_path: Path) -> None:
    assert_one_line_error(invoke("export", engine_arts["nvfp4"], "--to", "compressed-tensors", "-o", tmp_path / "x"),
                          2, "8-bit float", "--to modelopt")  # fmt: skip
    assert not (tmp_path / "x").exists()
    assert_one_line_error(invoke("export", engine_arts["fp8-head"], "--to", "compressed-tensors"), 2, "-o DIR")
    j = invoke("export", engine_arts["fp8-head"], "--to", "compressed-tensors", "--json")
    assert j.exit_code == 0
    assert json.loads(j.stdout)["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"


def test_folder_export_is_atomic_and_needs_overwrite(engine_arts: dict[str, Path], tmp_path: Path) -> None:
    out, _ = _export_dir(engine_arts["fp8-tensor"], "compressed-tensors", tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(invoke("export", engine_arts["fp8-head"], "--to", "compressed-tensors", "-o", out), 2,
                          "--overwrite")  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = invoke("export", engine_arts["fp8-head"], "--to", "compressed-tensors", "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "config_patch.json").read_text())["quantization_config"]["kv_cache_scheme"][
        "strategy"] == "attn_head"  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed-tensors"]  # no temporary or old folder left


# -- modelopt -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "algo", "scheme"), [
    ("fp8-head", "FP8", {"dynamic": False, "num_bits": 8, "type": "float"}),
    ("nvfp4", "NVFP4", "NVFP4"),
])  # fmt: skip
def test_modelopt_uniform_is_converted_by_modelopt(name: str, algo: str, scheme: Any, engine_arts: dict[str, Path],
                                                   lm: Any, tmp_path: Path) -> None:  # fmt: skip
    out, stderr = _export_dir(engine_arts[name], "modelopt", tmp_path)
    config = json.loads((out / "hf_quant_config.json").read_text())
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": algo, "exclude_modules": []}
    converted = modelopt_converter()(config)  # what ModelOpt writes into config.json's quantization_config
    assert converted["quant_method"] == "modelopt" and converted["kv_cache_scheme"] == scheme
    scales = load_file(out / SCALES_FILE)
    modules = {n for n, _ in lm.model.named_modules()}
    art = read_artifact(engine_arts[name])
    amax = {k: art.tensors[f"{k}_amax"] for k in ("k", "v")}
    for layer in range(lm.arch.num_layers):
        for kind in ("k", "v"):
            key = f"model.layers.{layer}.self_attn.{kind}_proj.{kind}_scale"
            assert key.rsplit(".", 1)[0] in modules
            assert scales[key].shape == () and scales[key].dtype == torch.float32
            assert vllm_remap(key) == f"model.layers.{layer}.self_attn.attn.{kind}_scale"
            if art.method["_data"]["observer"] == "amax":  # amax / 448 for FP8 and NVFP4 alike (ModelOpt's export)
                assert torch.allclose(scales[key].double(), amax[kind][layer].max() / 448)
    if name == "fp8-head":
        assert "become their maximum" in stderr


def test_modelopt_mixed_precision_schema(engine_arts: dict[str, Path], lm: Any, tmp_path: Path) -> None:
    """The layer-wise schema of Model-Optimizer PR #2272 (merged; not in the 0.47.0 wheel): ``MIXED_PRECISION`` for
    ``quant_algo`` and ``kv_cache_quant_algo``, ``kv_cache_quantized_layers`` keyed by attention module with
    ``FP8`` / ``NVFP4`` / ``FP8_K_NVFP4_V``, schema version 1, unquantized layers left out; 0.47.0's converter
    still accepts it (it passes ``MIXED_PRECISION`` on)."""
    art = read_artifact(engine_arts["mixed"])
    choice = art.extra["engine"]["choice"]
    out, _ = _export_dir(engine_arts["mixed"], "modelopt", tmp_path)
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    expected = {f"model.layers.{i}.self_attn": {"quant_algo": c} for i, c in enumerate(choice) if c != "model dtype"}
    if len(set(choice)) == 1 and choice[0] in ("FP8", "NVFP4"):
        pytest.skip("the search chose one format everywhere: uniform schema (tested above)")
    assert q == {"quant_algo": "MIXED_PRECISION", "quantized_layers": {}, "kv_cache_quant_algo": "MIXED_PRECISION",
                 "kv_cache_quantized_layers": expected, "kv_cache_schema_version": 1}  # fmt: skip
    assert set(c["quant_algo"] for c in expected.values()) <= {"FP8", "NVFP4", "FP8_K_NVFP4_V"}
    assert modelopt_converter()({"producer": {"name": "kvtool"}, "quantization": q})["kv_cache_scheme"] == (
        "MIXED_PRECISION")
    scales = load_file(out / SCALES_FILE)
    assert sorted(scales) == sorted(f"{m}.{k}_proj.{k}_scale" for m in expected for k in ("k", "v"))


def test_mixed_search_meets_its_budget(engine_arts: dict[str, Path], lm: Any) -> None:
    art = read_artifact(engine_arts["mixed"])
    assert art.extra["bits"]["all_in"] <= 7.0 + 1e-9
    t = transform_of(art)
    assert any(isinstance(x, Nvfp4Quantizer) for x in t.keys + t.values)
    assert not t.keys_pre_rope and t.sink_tokens == 0 and t.recent_tokens == 0  # what engines quantize


# -- vllm-skip-layers ------------------------------------------------------------------------------------------------


def test_vllm_skip_layers_is_parsed_as_vllm_parses_it(engine_arts: dict[str, Path]) -> None:
    skipped = read_artifact(engine_arts["fp8-tensor"]).extra["engine"]["skip_layers"]
    r = invoke("export", engine_arts["fp8-tensor"], "--to", "vllm-skip-layers")
    assert r.exit_code == 0, r.stderr
    ns = vllm_skip_layer_args(r.stdout.split())
    assert ns.kv_cache_dtype == "fp8" and ns.kv_cache_dtype_skip_layers == [str(i) for i in skipped]
    j = json.loads(invoke("export", engine_arts["fp8-tensor"], "--to", "vllm-skip-layers", "--json").stdout)
    assert j == {"kv_cache_dtype": "fp8", "kv_cache_dtype_skip_layers": [str(i) for i in skipped],
                 "args": r.stdout.split()}  # fmt: skip
    none = invoke("export", engine_arts["nvfp4"], "--to", "vllm-skip-layers")
    assert none.stdout == "--kv-cache-dtype nvfp4\n"  # nargs="+" takes no empty list: the flag is left out


def _sites(n: int) -> ScaleSites:
    return ScaleSites([f"model.layers.{i}.self_attn" for i in range(n)],
                      [{"k": f"model.layers.{i}.self_attn.k_proj", "v": f"model.layers.{i}.self_attn.v_proj"}
                       for i in range(n)])  # fmt: skip


def test_vllm_skip_layers_names_sliding_window() -> None:
    """Skipping exactly the sliding layers is vLLM's ``sliding_window`` entry (Gemma 3 style interleaving)."""
    types = ("sliding_attention", "full_attention") * 2
    arch = ArchInfo("gemma3_text", 4, 2, 4, 16, 64, 128, types, 8, {})
    fp8 = Fp8Quantizer("tensor", 0, torch.tensor([0.01]))
    t = KVTransform([None, fp8, None, fp8], [None, fp8, None, fp8], keys_pre_rope=False)
    e = export("vllm-skip-layers", t, arch, _sites(4))
    assert e.text == "--kv-cache-dtype fp8 --kv-cache-dtype-skip-layers sliding_window\n"
    assert vllm_skip_layer_args(e.text.split()).kv_cache_dtype_skip_layers == ["sliding_window"]


def test_engine_formats_refuse_what_engines_cannot_load() -> None:
    arch = ArchInfo("llama", 2, 2, 4, 16, 64, 128, ("full_attention",) * 2, None, {})
    fp8 = Fp8Quantizer("tensor", 0, torch.tensor([0.01]))
    fp4 = Nvfp4Quantizer(torch.tensor([0.01]))
    cases = [  # (transform, format, message fragment)
        (KVTransform.uniform(2, U(4, "token"), U(4, "token"), keys_pre_rope=False), "modelopt", "UniformQuantizer"),
        (KVTransform.uniform(2, fp8, fp8, keys_pre_rope=True), "compressed-tensors", "before RoPE"),
        (KVTransform.uniform(2, Fp8Quantizer(), fp8, keys_pre_rope=False), "modelopt", "no static scale"),
        (KVTransform([fp8, fp8], [fp4, fp8], keys_pre_rope=False), "vllm-skip-layers", "one KV dtype per layer"),
        (KVTransform([fp4, fp8], [fp4, fp8], keys_pre_rope=False), "vllm-skip-layers", "mixes FP8 and NVFP4"),
        (KVTransform([fp4, fp8], [fp8, fp8], keys_pre_rope=False), "modelopt", "none of ModelOpt's"),
        (KVTransform([None, None], [None, None], keys_pre_rope=False), "modelopt", "nothing"),
    ]
    for t, fmt, fragment in cases:
        with pytest.raises(UsageError, match=fragment):
            export(fmt, t, arch, _sites(2))
    with pytest.raises(UsageError, match="only an engine calibration records"):
        export("compressed-tensors", KVTransform.uniform(2, fp8, fp8, keys_pre_rope=False), arch, None)


def test_engine_formats_of_a_non_engine_artifact_fail_cleanly(tmp_path: Path) -> None:
    from kvtool.calibrators.precision_search import PrecisionSearch

    arch = ArchInfo("llama", 2, 2, 4, 16, 64, 128, ("full_attention",) * 2, None, {})
    model = {"id": "tiny", "config_digest": "sha256:" + "0" * 64, "weights_digest": "sha256:" + "1" * 64,
             "arch": arch.to_dict()}  # fmt: skip
    art = calibration_artifact(model, PrecisionSearch(), {}, KVTransform.uniform(2, U(4), U(4)), {}, {}, 64)
    path = tmp_path / "search.kvcal.safetensors"
    write_artifact(path, art)
    assert scale_sites(read_artifact(path)) is None
    for fmt in ("compressed-tensors", "modelopt", "vllm-skip-layers"):
        assert_one_line_error(invoke("export", path, "--to", fmt, "-o", tmp_path / fmt), 2, "layer 0 keys",
                              "--kv-dtype")  # fmt: skip
        assert not (tmp_path / fmt).exists()


def test_engine_calibration_settings_errors_name_flags(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="target_bits"):
        EngineKVCalibration(kv_dtype="mixed")
    r = invoke("calibrate", "--kv-dtype", "mixed", "-o", tmp_path / "x.kvcal.safetensors")
    assert_one_line_error(r, 2, "--target-bits")
    r = invoke("calibrate", "--kv-dtype", "fp8", "--observer", "p99", "-o", tmp_path / "x.kvcal.safetensors")
    assert_one_line_error(r, 2, "--observer")
    r = invoke("calibrate", "--method", "pca", "--skip-budget", "2", "-o", tmp_path / "x.kvcal.safetensors")
    assert_one_line_error(r, 2, "--method engine")


def test_max_ppl_delta_keeps_the_fewest_layers_that_pass(lm: Any, tiny_model_dir: Path, text_file: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """``--kv-dtype nvfp4 --max-ppl-delta P``: the written artifact keeps the fewest of the most sensitive layers in
    the model dtype whose held-out ΔPPL (recorded, and re-measured here on the artifact's own transform) is <= P."""
    from kvtool.eval.validation import validate_transform

    cal = calibrator("engine", kv_dtype="nvfp4", **SMALL)
    quantized = validate_transform(lm, transform_of(calibrate(lm, cal, text=str(text_file))[0]), tokens=96)
    gate = quantized["delta_ppl_pct"] / 2  # everything in NVFP4 fails it (when the tiny model degrades at all)
    out = tmp_path / "gate.kvcal.safetensors"
    r = invoke("calibrate", tiny_model_dir, "--text", text_file, "--num-seqs", 2, "--seq-len", 48, "--kv-dtype",
               "nvfp4", "--max-ppl-delta", gate, "--validate-tokens", 96, "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    art = read_artifact(out)
    v = art.extra["validation"]
    assert v["delta_ppl_pct"] <= gate
    again = validate_transform(lm, transform_of(art), tokens=96)
    assert again["delta_ppl_pct"] == pytest.approx(v["delta_ppl_pct"])
    skipped = art.extra["engine"]["skip_layers"]
    assert art.method["_data"]["skip_budget"] == len(skipped)
    if quantized["delta_ppl_pct"] > 0:
        assert 1 <= len(skipped) <= lm.arch.num_layers
    assert "layer(s) in the model dtype" in r.stderr


def test_inspect_shows_choice_scales_and_amax(engine_arts: dict[str, Path]) -> None:
    r = invoke("inspect", engine_arts["fp8-head"], "--json")
    assert r.exit_code == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    art = read_artifact(engine_arts["fp8-head"])
    t = transform_of(art)
    for i, row in enumerate(layers):
        assert row["choice"] == art.extra["engine"]["choice"][i] == "FP8"
        lo, hi = float(t.keys[i].scale.min()), float(t.keys[i].scale.max())
        assert row["K scale"] == f"{lo:.4g}..{hi:.4g} ({t.keys[i].scale.numel()} heads)"
        assert row["V amax"] == f"{float(art.tensors['v_amax'][i].max()):.4g}"


def test_resolve_rechooses_layers_without_the_model(engine_arts: dict[str, Path], lm: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.kvcal.safetensors"
    r = invoke("calibrate", "--resolve", engine_arts["mixed"], "--target-bits", 5.0, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    art = read_artifact(out)
    assert art.extra["bits"]["all_in"] <= 5.0 + 1e-9 and art.method["_data"]["target_bits"] == 5.0
    assert transform_of(art).bits  # a loadable transform
    nv = tmp_path / "n.kvcal.safetensors"
    one_skipped = (16 + (lm.arch.num_layers - 1) * 4.6) / lm.arch.num_layers  # room for one layer in bf16
    r = invoke("calibrate", "--resolve", engine_arts["nvfp4"], "--target-bits", one_skipped, "-o", nv)
    assert r.exit_code == 0, r.stderr
    assert 0 < len(read_artifact(nv).extra["engine"]["skip_layers"])  # NVFP4 4.5 bits + some bf16 layers
    # what was measured cannot change without the model: such flags are refused, not silently ignored
    r = invoke("calibrate", "--resolve", engine_arts["mixed"], "--target-bits", 5.0, "--observer", "mse",
               "--num-seqs", 2, "-o", tmp_path / "x.kvcal.safetensors")  # fmt: skip
    assert_one_line_error(r, 2, "--observer", "--num-seqs", "budget only")


def test_every_architecture_calibrates_and_exports(tiny: Any, tmp_path: Path) -> None:
    """Llama, Mistral, Qwen2 and Gemma 3 (sliding windows shorter than the calibration sequences): the engine
    calibration finds every layer's attention module and projections through the model itself, and the exported
    scale names are modules of that model; a Gemma 3 calibration with its sliding layers skipped exports vLLM's
    ``sliding_window`` entry."""
    from tiny_models import TinyLM

    from kvtool.models import model_record

    lm = TinyLM(tiny)
    ids = torch.randint(0, lm.arch.vocab_size, (4 * 64,), generator=torch.Generator().manual_seed(0))
    cal = calibrator("engine", kv_dtype="fp8", num_seqs=2, seq_len=64)
    table = cal.fit(lm, ids, special_prefix=[])
    art = cal.artifacts(model_record(lm), {}, table)[0]
    modules = {n for n, _ in lm.model.named_modules()}
    sites = scale_sites(art)
    assert sites is not None and all(m in modules for m in sites.attention)
    assert all(p is not None and p["k"] in modules and p["v"] in modules for p in sites.kv_proj)
    for fmt in ("compressed-tensors", "modelopt"):
        e = export(fmt, transform_of(art), lm.arch, sites)
        assert e.files
    sliding = [i for i, t in enumerate(lm.arch.layer_types) if t == "sliding_attention"]
    if sliding:
        assert max(lm.arch.sliding_window or 0, 1) < 64  # the windows are shorter than the sequences
        t = transform_of(art)
        for i in sliding:
            t.keys[i] = t.values[i] = None
        if len(sliding) < lm.arch.num_layers:
            got = export("vllm-skip-layers", t, lm.arch, sites).data["kv_cache_dtype_skip_layers"]
            assert got == ["sliding_window"]
        else:  # Mistral: every layer slides; skipping them all leaves nothing to quantize
            with pytest.raises(UsageError, match="no layer is quantized"):
                export("vllm-skip-layers", t, lm.arch, sites)


def test_engine_presets_with_dynamic_scales_run_in_attention(lm: Any) -> None:
    """``fp8``, ``fp8-head``, ``nvfp4`` in ``bench --configs``: the engine formats with each tensor's own amax as its
    scale, post-RoPE, every token quantized."""
    from kvtool.eval.harness import perplexity
    from kvtool.eval.presets import parse_preset

    ids = torch.randint(0, lm.arch.vocab_size, (96,), generator=torch.Generator().manual_seed(0))
    for name, bits in (("fp8", 8.0), ("fp8-head", 8.0), ("nvfp4", 4.5)):
        t = parse_preset(name, lm.arch)
        assert not t.keys_pre_rope and t.sink_tokens == t.recent_tokens == 0
        assert bits <= t.bits(lm.arch, 48)["all_in"] < bits + 0.1
        assert torch.isfinite(torch.tensor(perplexity(lm.model, ids, 48, t).ppl))


def test_kl_sensitivity_is_measured_recorded_and_ranks_the_layers(engine_arts: dict[str, Path], lm: Any) -> None:
    """``--sensitivity kl``: per layer and ModelOpt format the measured KL of quantizing that layer alone, kept in
    the artifact; the search's choice is the knapsack on it (re-solving the recorded table gives the same)."""
    from kvtool.calibrators.engine_kv import MODELOPT_PAIRS, choose_layers, engine_table_from

    art = read_artifact(engine_arts["mixed-kl"])
    kl = art.tensors["layer_kl"]
    assert tuple(kl.shape) == (lm.arch.num_layers, len(MODELOPT_PAIRS)) and bool((kl >= 0).all())
    cal, table = engine_table_from(art)
    assert cal.sensitivity == "kl" and choose_layers(cal, table) == art.extra["engine"]["choice"]
    assert art.extra["bits"]["all_in"] <= 7.0 + 1e-9


def test_kl_replay_equals_full_passes(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-layer KL with the earlier layers' outputs replayed equals the KL of full forward passes bit for bit,
    on every tiny architecture (sliding windows included), and the model is left as it was."""
    import kvtool.calibrators.engine_kv as ek

    model = tiny.model
    cal = ek.EngineKVCalibration(kv_dtype="mixed", target_bits=7.0, observer="mse", num_seqs=2, seq_len=96)
    ids = torch.randint(0, model.config.vocab_size, (4000,), generator=torch.Generator().manual_seed(1))
    table = ek.measure_engine_table(model, tiny.info, ids, cal)
    window = ek.calibration_windows(ids, cal.seq_len, cal.num_seqs, cal.seed, ())[0]
    assert ek.decoder_layers(model, table.modules) is not None
    replayed = ek._layer_kl(model, window, table, cal)
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(ek, "decoder_layers", lambda *_: None)  # every pass computes every layer
    assert np.array_equal(replayed, ek._layer_kl(model, window, table, cal))


def test_kl_is_measured_on_the_first_kl_tokens(tiny: Any) -> None:
    """``kl_tokens``: the per-layer KL is that of the first ``kl_tokens`` tokens of the first calibration window
    (the cost of the passes grows faster than linearly with the tokens), and differs from the whole window's."""
    import kvtool.calibrators.engine_kv as ek

    model = tiny.model
    cal = ek.EngineKVCalibration(kv_dtype="mixed", target_bits=7.0, observer="mse", sensitivity="kl", num_seqs=2,
                                 seq_len=96, kl_tokens=40)  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (4000,), generator=torch.Generator().manual_seed(1))
    table = ek.measure_engine_table(model, tiny.info, ids, cal)
    window = ek.calibration_windows(ids, cal.seq_len, cal.num_seqs, cal.seed, ())[0]
    assert np.array_equal(table.kl, ek._layer_kl(model, window[:40], table, cal))
    assert not np.array_equal(table.kl, ek._layer_kl(model, window, table, cal))


def test_kl_tokens_settings() -> None:
    """By default the whole first sequence (what records without the field measured); too few tokens are refused;
    the flag belongs to the engine method."""
    from kvtool import config as kvconfig

    data = {"kv_dtype": "mixed", "target_bits": 5.0, "sensitivity": "kl", "seq_len": 1024}
    assert kvconfig.from_dict({"_type": "EngineKVCalibration", "_version": 1, "_data": data}).kl_tokens is None
    assert EngineKVCalibration(kl_tokens=64).kl_tokens == 64
    with pytest.raises(UsageError, match="kl_tokens"):
        EngineKVCalibration(kl_tokens=8)
    assert_one_line_error(invoke("calibrate", "tiny", "--method", "pca", "--kl-tokens", 100), 2, "--kl-tokens",
                          "--method engine")  # fmt: skip


def test_a_malformed_engine_record_is_exit_3(engine_arts: dict[str, Path], tmp_path: Path) -> None:
    """An engine artifact whose record lacks what the exports and --resolve read (a consistent digest: written by
    kvtool's own writer, so only the content is wrong) is refused with one line and exit 3."""
    art = read_artifact(engine_arts["fp8-tensor"])
    del art.extra["engine"]["modules"]
    bad = tmp_path / "bad.kvcal.safetensors"
    write_artifact(bad, art)
    assert_one_line_error(invoke("export", bad, "--to", "compressed-tensors", "-o", tmp_path / "x"), 3,
                          "malformed engine calibration record")  # fmt: skip
    assert not (tmp_path / "x").exists()
    art = read_artifact(engine_arts["fp8-tensor"])
    del art.tensors["k_clip_error"]
    write_artifact(bad, art)
    assert_one_line_error(invoke("calibrate", "--resolve", bad, "--target-bits", 8.0, "-o", tmp_path / "r.kvcal"), 3,
                          "malformed engine calibration record")  # fmt: skip
