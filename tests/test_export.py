"""``kvtool export``: exact output of every format for a hand-built mixed-precision calibration, and every failure.

No model is needed: the calibration artifact is assembled from a :class:`KVTransform` and written as the
calibrator would.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_one_line_error as _assert_error_contract
from cli_helpers import invoke

from kvtool.arch import ArchInfo
from kvtool.artifacts import write_artifact
from kvtool.calibration import calibration_artifact
from kvtool.calibrators.precision_search import PrecisionSearch
from kvtool.config import register
from kvtool.errors import UsageError
from kvtool.exports import FORMATS, export, runs
from kvtool.quantizers import FloatCast
from kvtool.quantizers import UniformQuantizer as U
from kvtool.transforms import BitCost, KVTransform, TensorTransform

LAYERS = 6
HEAD_DIM = 16


def arch(layer_types: tuple[str, ...] = ("full_attention",) * LAYERS) -> ArchInfo:
    return ArchInfo("llama", LAYERS, 2, 4, HEAD_DIM, 64, 128, layer_types, None, {"rope_theta": 10000.0})


@register
@dataclass(frozen=True)
class ExportTestCodebook(TensorTransform):
    """A non-uniform method no export format can represent."""

    entries: int = 16

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        return BitCost(4.0, 4.0)

    def label(self) -> str:
        return f"codebook{self.entries}"


def mixed() -> KVTransform:
    """Keys int8 (0-1) / int4 (2-5) per channel; values int2 (0-1) / int4 (2-3) per token, fp16 (4), untouched (5)."""
    return KVTransform(
        [U(8, "channel", 32)] * 2 + [U(4, "channel", 32)] * 4,
        [U(2, "token")] * 2 + [U(4, "token")] * 2 + [FloatCast("float16"), None],
        sink_tokens=1,
        recent_tokens=16,
        name="mixed",
    )


def write(path: Path, transform: KVTransform, info: ArchInfo | None = None) -> Path:
    info = info or arch()
    model = {
        "id": "tiny",
        "config_digest": "sha256:" + "0" * 64,
        "weights_digest": "sha256:" + "1" * 64,
        "arch": info.to_dict(),
    }
    art = calibration_artifact(model, PrecisionSearch(), {"text": "calibration"}, transform, {}, {}, 64)
    write_artifact(path, art)
    return path


@pytest.fixture
def cal(tmp_path: Path) -> Path:
    return write(tmp_path / "cal.safetensors", mixed())




def assert_one_line_error(result, code: int, *fragments: str) -> None:
    """The shared contract, and export prints nothing else on stderr before its error."""
    _assert_error_contract(result, code, *fragments)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


KVTUNER_YAML = """\
# KVTuner per-layer KV bits, exported by kvtool from the calibrated transform 'mixed' (6 layers).
# Load: FlexibleQuantizedCacheConfig(per_layer_quant=True, per_layer_config_path=<this file>, ...)
# Backends: Vanilla takes any integer bits; HQQ only 2, 4 and 8 (KVTuner's own presets use no others).
# This file holds bits only; KVTuner's axis, group size and residual are global settings. Not represented:
#   grouping per layer (KVTuner sets one axis and group size for all layers): \
keys 0-5:channel-g32 and values 0-3:token,4:fp16,5:none
#   zero points: kvtool stores the fp16 group minimum, KVTuner rounds the zero point to an integer
#   sink tokens kept in fp16: 1 (KVTuner keeps none)
#   recent tokens kept in fp16: 16 (KVTuner's global residual_length: 32 in kivi mode, 0 in pertoken)
#   keys were quantized before RoPE but KVTuner quantizes the cached post-RoPE keys
#   layers kept unquantized (values 4-5) are written as 8 bits: KVTuner has no unquantized setting and its \
vanilla quantizer stores int8 codes
#   closest KVTuner mode: kivi (axis_key=1, axis_value=0, q_group_size=32, residual_length=32)
0:
  nbits_key: 8
  nbits_value: 2
1:
  nbits_key: 8
  nbits_value: 2
2:
  nbits_key: 4
  nbits_value: 4
3:
  nbits_key: 4
  nbits_value: 4
4:
  nbits_key: 4
  nbits_value: 8
5:
  nbits_key: 4
  nbits_value: 8
"""

KVTUNER_LAYERS = {
    0: {"nbits_key": 8, "nbits_value": 2},
    1: {"nbits_key": 8, "nbits_value": 2},
    2: {"nbits_key": 4, "nbits_value": 4},
    3: {"nbits_key": 4, "nbits_value": 4},
    4: {"nbits_key": 4, "nbits_value": 8},
    5: {"nbits_key": 4, "nbits_value": 8},
}


# -- formats ------------------------------------------------------------------------------------------------


def test_kvtuner_yaml_exact_and_round_trip(cal: Path) -> None:
    r = invoke("export", cal, "--to", "kvtuner-yaml")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == KVTUNER_YAML
    assert yaml.safe_load(r.stdout) == KVTUNER_LAYERS  # what FlexibleQuantizedCacheConfig reads
    assert r.stderr.startswith("kvtool: warning: lossy export: grouping per layer") and r.stderr.count("\n") == 1
    j = invoke("export", cal, "--to", "kvtuner-yaml", "--json")
    assert json.loads(j.stdout) == {str(i): b for i, b in KVTUNER_LAYERS.items()}


def test_kvtuner_pertoken_mode() -> None:
    t = KVTransform.uniform(LAYERS, U(4, "token"), U(2, "token"), keys_pre_rope=False)
    text = export("kvtuner-yaml", t, arch()).text
    assert "closest KVTuner mode: pertoken (axis_key=0, axis_value=0, q_group_size=-1, residual_length=0)" in text
    assert yaml.safe_load(text) == {i: {"nbits_key": 4, "nbits_value": 2} for i in range(LAYERS)}


def test_layer_dtypes_was_removed(cal: Path) -> None:
    """No engine parses per-layer dtype range strings: the format is gone, with a message that says where to go."""
    assert_one_line_error(invoke("export", cal, "--to", "layer-dtypes"), 2, "was removed", "vllm-skip-layers")
    assert "layer-dtypes" not in FORMATS


def test_kvtuner_names_bits_its_hqq_backend_rejects() -> None:
    t = KVTransform.uniform(LAYERS, U(3, "token"), U(2, "token"), keys_pre_rope=False)
    e = export("kvtuner-yaml", t, arch())
    assert any("bits 3 run on KVTuner's Vanilla backend only" in n for n in e.lossy)
    assert not any("HQQ backend takes" in n for n in export("kvtuner-yaml", mixed(), arch()).lossy)


def test_runs_merge_maximal_consecutive_runs() -> None:
    assert runs(["int4", "int4", "int2", "int4", "int4", "int4"]) == "0-1:int4,2:int2,3-5:int4"
    assert runs(["bf16"]) == "0:bf16"
    assert runs([]) == ""


def test_hf_cache_config_exact(cal: Path) -> None:
    r = invoke("export", cal, "--to", "hf-cache-config")
    assert r.exit_code == 0, r.stderr
    expected = {
        "backend": "quanto",
        "nbits": 4,
        "axis_key": 0,
        "axis_value": 0,
        "q_group_size": HEAD_DIM,  # values are per-token over the whole head
        "residual_length": 16,
    }
    assert r.stdout == json.dumps(expected, indent=2) + "\n"
    # Loadable as keyword arguments of transformers' QuantizedCache (and generate's cache_config).
    from transformers.cache_utils import QuantizedCache

    inspect.signature(QuantizedCache.__init__).bind(None, config=None, **json.loads(r.stdout))
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtool: warning: lossy export: ")
    for fragment in ("int8 is more than quanto's 4 bits", "mixed bits (keys 0-1:int8,2-5:int4", "values 4-5"):
        assert fragment in lines[0]


def test_hf_cache_config_representable_is_silent() -> None:
    t = KVTransform.uniform(LAYERS, U(2, "token", 8), U(2, "token", 8), keys_pre_rope=False)
    e = export("hf-cache-config", t, arch())
    assert e.data == {
        "backend": "quanto",
        "nbits": 2,
        "axis_key": 0,
        "axis_value": 0,
        "q_group_size": 8,
        "residual_length": 0,
    }
    assert e.lossy == []


def test_hf_cache_config_rounds_bits_up() -> None:
    t = KVTransform.uniform(LAYERS, U(3, "token"), U(3, "token"), keys_pre_rope=False)
    e = export("hf-cache-config", t, arch())
    assert e.data["nbits"] == 4
    assert e.lossy == ["int3 becomes nbits=4 (quanto has 2 and 4 bits)"]


def test_hf_cache_config_refuses_what_quantizedcache_cannot_load(tmp_path: Path) -> None:
    sliding = write(
        tmp_path / "sliding.safetensors", mixed(), arch(("sliding_attention", "full_attention") * (LAYERS // 2))
    )
    assert_one_line_error(invoke("export", sliding, "--to", "hf-cache-config"), 2, "sliding_attention")
    fp16 = write(tmp_path / "fp16.safetensors", KVTransform.uniform(LAYERS, FloatCast(), None))
    assert_one_line_error(invoke("export", fp16, "--to", "hf-cache-config"), 2, "no layer is quantized")


# -- output file --------------------------------------------------------------------------------------------


def test_output_file_quiet_prints_path_only(cal: Path, tmp_path: Path) -> None:
    out = tmp_path / "layers.yaml"
    r = invoke("export", cal, "--to", "kvtuner-yaml", "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"{out}\n"
    assert out.read_text() == KVTUNER_YAML
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.safetensors", "layers.yaml"]  # no temporary left
    j = invoke("export", cal, "--to", "hf-cache-config", "-o", tmp_path / "cfg.json", "--json")
    assert j.exit_code == 0, j.stderr
    info = json.loads(j.stdout)
    assert info["path"] == str(tmp_path / "cfg.json") and info["format"] == "hf-cache-config"
    assert info["bytes"] == (tmp_path / "cfg.json").stat().st_size and info["lossy"]


def test_existing_output_needs_overwrite(cal: Path, tmp_path: Path) -> None:
    out = tmp_path / "kvtuner.yaml"
    out.write_text("keep me\n")
    assert_one_line_error(invoke("export", cal, "--to", "kvtuner-yaml", "-o", out), 2, "--overwrite")
    assert out.read_text() == "keep me\n"
    r = invoke("export", cal, "--to", "kvtuner-yaml", "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0, r.stderr
    assert out.read_text() == KVTUNER_YAML


# -- failures -----------------------------------------------------------------------------------------------


def test_unknown_format(cal: Path) -> None:
    assert_one_line_error(invoke("export", cal, "--to", "gguf"), 2, "unknown export format 'gguf'", *FORMATS)
    with pytest.raises(UsageError):
        export("gguf", mixed(), arch())


def test_missing_to_and_json_with_quiet(cal: Path) -> None:
    assert invoke("export", cal).exit_code == 2
    assert_one_line_error(invoke("export", cal, "--to", "kvtuner-yaml", "--json", "-q"), 2, "--json")


def test_corrupted_artifact(cal: Path, tmp_path: Path) -> None:
    data = bytearray(cal.read_bytes())
    data[-1] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    assert_one_line_error(invoke("export", bad, "--to", "hf-cache-config"), 3)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(cal.read_bytes()[:40])
    assert_one_line_error(invoke("export", truncated, "--to", "kvtuner-yaml"), 3)


@pytest.mark.parametrize("fmt", ["kvtuner-yaml", "hf-cache-config"])  # engine formats: test_engine_exports.py
def test_non_representable_method(fmt: str, tmp_path: Path) -> None:
    t = mixed()
    t.keys[3] = ExportTestCodebook()
    path = write(tmp_path / "nuq.safetensors", t)
    assert_one_line_error(invoke("export", path, "--to", fmt), 2, "layer 3 keys", "ExportTestCodebook (codebook16)")


def test_non_uniform_layers_export_as_uniform_bits_with_a_warning() -> None:
    from kvtool.exports import export
    from kvtool.quantizers import NonUniformQuantizer

    arch = ArchInfo("llama", 2, 2, 4, 16, 64, 128, ("full_attention",) * 2, None, {})
    nuq = NonUniformQuantizer(3, "token", 2, 16, table="nf")
    t = KVTransform([U(4, "channel", 32), nuq], [nuq, U(2, "token")], sink_tokens=1)
    e = export("kvtuner-yaml", t, arch)
    assert yaml.safe_load(e.text) == {0: {"nbits_key": 4, "nbits_value": 3}, 1: {"nbits_key": 3, "nbits_value": 2}}
    assert any("non-uniform datatypes (keys 1, values 0)" in n for n in e.lossy)
