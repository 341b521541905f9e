"""What serving engines load from an engine calibration (``kvtool calibrate --kv-dtype``): static FP8 / NVFP4 KV
scales and the layers kept in the model dtype, in each engine's own format.

* ``compressed-tensors`` (vLLM, llm-compressor): a ``config.json`` patch with a KV-only ``quantization_config``
  (``kv_cache_scheme`` 8-bit float, ``strategy`` ``tensor`` or ``attn_head``, empty ``config_groups``) and the
  scales ``<attention>.k_scale`` / ``.v_scale``: float32 ``(1,)`` or ``(kv_heads, 1, 1)``, ``amax / 448``.
  vLLM: ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` (type float, 8 bits, tensor / attn_head,
  symmetric) and ``maybe_remap_kv_scale_name`` (``...self_attn.k_scale`` → ``...self_attn.attn.k_scale``).
* ``modelopt`` (TensorRT-LLM, ModelOpt, vLLM): ``hf_quant_config.json``, uniform ``kv_cache_quant_algo`` ``FP8`` /
  ``NVFP4``, or the layer-wise ``MIXED_PRECISION`` schema v1 (Model-Optimizer PR #2272: per attention module
  ``FP8``, ``NVFP4`` or ``FP8_K_NVFP4_V``; modules left out keep unquantized KV), with scalar float32 scales
  ``<k_proj>.k_scale`` / ``<v_proj>.v_scale`` = ``amax / 448`` for FP8 and NVFP4 alike (ModelOpt's
  ``unified_export_hf.py``).
* ``vllm-skip-layers``: ``--kv-cache-dtype fp8|nvfp4 --kv-cache-dtype-skip-layers 0 5 ...`` (vLLM
  ``CacheConfig.kv_cache_dtype_skip_layers``: layer indices as strings, or ``sliding_window``; K and V together).

Scales go to checkpoint names found in the model at calibration time (:class:`~kvtool.exports._common.ScaleSites`),
not assumed. Sharded checkpoints list files in ``model.safetensors.index.json`` and vLLM loads only listed files:
each folder export also has the ``weight_map`` entries to merge there.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from kvtool._version import __version__
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact
from kvtool.calibrators.engine_kv import MODELOPT_PAIRS, engine_table_from
from kvtool.errors import UsageError
from kvtool.exports._common import Export, Note, ScaleSites, layer_ranges
from kvtool.quantizers import FloatCast, Fp8Quantizer, Nvfp4Quantizer
from kvtool.quantizers.fp8 import E4M3_MAX
from kvtool.transforms import KVTransform, TensorTransform

SCALES_FILE = "kv_cache_scales.safetensors"
INDEX_PATCH = "model.safetensors.index.patch.json"
#: ModelOpt's per-layer KV algorithms by (key dtype, value dtype): the calibrator's names, inverted
MODELOPT_ALGOS = {pair: algo for algo, pair in MODELOPT_PAIRS.items()}
_HOW = "calibrate with kvtool calibrate --kv-dtype fp8|nvfp4|mixed"


def scale_sites(art: Artifact) -> ScaleSites | None:
    """Where the checkpoint holds KV scales, as an engine calibration recorded it (``None`` for other artifacts)."""
    if "engine" not in art.extra:
        return None
    _, table = engine_table_from(art)
    return ScaleSites(table.modules, table.kv_proj, table.amax)


def _dtype(t: TensorTransform | None, layer: int, kind: str, fmt: str) -> str | None:
    """``"fp8"``, ``"nvfp4"`` or ``None`` (kept in a 16-bit dtype: the engine's model dtype) of one slot."""
    where = f"layer {layer} {'keys' if kind == 'k' else 'values'}"
    if t is None or isinstance(t, FloatCast):
        return None
    if isinstance(t, Fp8Quantizer | Nvfp4Quantizer):
        if t.scale is None:
            raise UsageError(f"{where}: {t.label()} has no static scale, which {fmt} stores: {_HOW}")
        return "fp8" if isinstance(t, Fp8Quantizer) else "nvfp4"
    raise UsageError(
        f"{where}: {type(t).__name__} ({t.label()}) cannot be exported to {fmt}: engines store FP8 or NVFP4 KV; {_HOW}"
    )


def engine_layers(transform: KVTransform, fmt: str) -> tuple[list[tuple[str | None, str | None]], list[Note]]:
    """Per layer (key dtype, value dtype), checked against what engines do, and the notes on what they drop."""
    layers = [(_dtype(k, i, "k", fmt), _dtype(v, i, "v", fmt))
              for i, (k, v) in enumerate(zip(transform.keys, transform.values, strict=True))]  # fmt: skip
    if transform.keys_pre_rope and any(k for k, _ in layers):
        raise UsageError(f"keys were quantized before RoPE, engines quantize the cached post-RoPE keys: {_HOW}")
    notes = []
    if transform.sink_tokens or transform.recent_tokens:
        notes.append(Note(f"fp16 sink / recent tokens ({transform.sink_tokens} / {transform.recent_tokens}): "
                          "engines quantize every cached token"))  # fmt: skip
    return layers, notes


def _kv_together(layers: list[tuple[str | None, str | None]], fmt: str) -> None:
    for i, (k, v) in enumerate(layers):
        if k != v:
            raise UsageError(f"layer {i}: keys {k or 'model dtype'} and values {v or 'model dtype'}: {fmt} takes one "
                             "KV dtype per layer; export --to modelopt")  # fmt: skip


def _site(sites: ScaleSites | None, layer: int, fmt: str, proj: bool = False) -> Any:
    if sites is None:
        raise UsageError(f"{fmt} names scales by the model's modules, which only an engine calibration records: {_HOW}")
    if proj:
        got = sites.kv_proj[layer]
        if got is None:
            raise UsageError(f"layer {layer}: the attention has no separate k_proj / v_proj, where ModelOpt's "
                             "checkpoints hold KV scales (k_proj.k_scale); export --to compressed-tensors")  # fmt: skip
        return got
    if sites.attention[layer] is None:
        raise UsageError(f"layer {layer}: no attention module was found for it at calibration time")
    return sites.attention[layer]


def _scale(t: TensorTransform | None) -> torch.Tensor:
    assert isinstance(t, Fp8Quantizer | Nvfp4Quantizer) and t.scale is not None
    return t.scale.detach().float().cpu().reshape(-1)


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: tensors[k].contiguous() for k in sorted(tensors)}, metadata={"producer": f"kvtool {__version__}"})


def _index_patch(tensors: dict[str, torch.Tensor]) -> bytes:
    return (json.dumps({"weight_map": {k: SCALES_FILE for k in sorted(tensors)}}, indent=2) + "\n").encode()


def _skip_note(skipped: list[int], dtype: str) -> Note:
    flags = " ".join(str(i) for i in skipped)
    return Note(f"layers {layer_ranges(skipped)} stay in the model dtype, which this format cannot say: serve with "
                f"--kv-cache-dtype {dtype} --kv-cache-dtype-skip-layers {flags} (vLLM)")  # fmt: skip


# -- compressed-tensors ---------------------------------------------------------------------------------------------


def compressed_tensors(transform: KVTransform, arch: ArchInfo, sites: ScaleSites | None) -> Export:
    """A KV-only compressed-tensors ``quantization_config`` and its scale tensors (see the module docstring)."""
    fmt = "compressed-tensors"
    layers, notes = engine_layers(transform, fmt)
    _kv_together(layers, fmt)
    if any(k == "nvfp4" for k, _ in layers):
        raise UsageError("compressed-tensors' kv_cache_scheme is 8-bit float (vLLM validate_kv_cache_scheme): "
                         "NVFP4 layers export --to modelopt or --to vllm-skip-layers")  # fmt: skip
    fp8 = [t for t in transform.keys + transform.values if isinstance(t, Fp8Quantizer)]
    if not fp8:
        raise UsageError("no layer is FP8: there is nothing for compressed-tensors to hold")
    grains = {t.granularity for t in fp8}
    if len(grains) > 1:
        raise UsageError("FP8 scales per tensor in some layers and per head in others: compressed-tensors has one "
                         "strategy")  # fmt: skip
    head = grains == {"head"}
    shape = (arch.num_kv_heads, 1, 1) if head else (1,)
    tensors: dict[str, torch.Tensor] = {}
    skipped = [i for i, (k, _) in enumerate(layers) if k is None]
    for i, (k, _) in enumerate(layers):
        attn = _site(sites, i, fmt)
        for kind, t in (("k", transform.keys[i]), ("v", transform.values[i])):
            if k is not None:
                tensors[f"{attn}.{kind}_scale"] = _scale(t).reshape(shape)
            elif sites is not None and sites.amax is not None:
                # a calibrated scale for a skipped layer too: an engine not told to skip it still gets a sane one
                amax = np.asarray(sites.amax[kind][i], dtype=np.float64)
                s = amax if head else np.array([amax.max()])
                tensors[f"{attn}.{kind}_scale"] = torch.tensor(s / E4M3_MAX, dtype=torch.float32).reshape(shape)
    scheme = {"num_bits": 8, "type": "float", "strategy": "attn_head" if head else "tensor", "dynamic": False,
              "symmetric": True}  # fmt: skip
    config = {"quant_method": "compressed-tensors", "format": "dense", "quantization_status": "frozen",
              "config_groups": {}, "ignore": [], "kv_cache_scheme": scheme}  # fmt: skip
    patch = {"quantization_config": config}
    if skipped:
        notes.append(_skip_note(skipped, "fp8"))
    text = json.dumps(patch, indent=2) + "\n"
    files = {"config_patch.json": text.encode(), SCALES_FILE: _safetensors(tensors), INDEX_PATCH: _index_patch(tensors)}
    data = {**patch, "scales": {k: list(v.shape) for k, v in sorted(tensors.items())}}
    return Export(fmt, text, data, notes, files)


# -- modelopt -------------------------------------------------------------------------------------------------------


def modelopt(transform: KVTransform, arch: ArchInfo, sites: ScaleSites | None) -> Export:
    """ModelOpt's ``hf_quant_config.json`` (uniform or ``MIXED_PRECISION`` v1) and its scale tensors."""
    fmt = "modelopt"
    layers, notes = engine_layers(transform, fmt)
    algos: list[str | None] = []
    for i, pair in enumerate(layers):
        if pair == (None, None):
            algos.append(None)
        elif pair in MODELOPT_ALGOS:
            algos.append(MODELOPT_ALGOS[pair])  # type: ignore[index]
        else:
            known = ", ".join(MODELOPT_ALGOS.values())
            raise UsageError(f"layer {i}: keys {pair[0] or 'model dtype'} with values {pair[1] or 'model dtype'} is "
                             f"none of ModelOpt's per-layer KV formats ({known})")  # fmt: skip
    if not any(algos):
        raise UsageError("no layer is FP8 or NVFP4: there is nothing for ModelOpt's config to hold")
    tensors: dict[str, torch.Tensor] = {}
    per_head = []
    for i, algo in enumerate(algos):
        if algo is None:
            continue
        proj = _site(sites, i, fmt, proj=True)
        for kind, t in (("k", transform.keys[i]), ("v", transform.values[i])):
            s = _scale(t)
            if s.numel() > 1:
                per_head.append(i)
            tensors[f"{proj[kind]}.{kind}_scale"] = s.max().reshape(())  # ModelOpt's scales are scalars
    if per_head:
        notes.append(Note(f"FP8 scales per KV head (layers {layer_ranges(sorted(set(per_head)))}) become their "
                          "maximum: ModelOpt's k_scale / v_scale are per tensor"))  # fmt: skip
    quantized = {str(_site(sites, i, fmt)): {"quant_algo": a} for i, a in enumerate(algos) if a is not None}
    uniform = len(set(algos)) == 1 and algos[0] in ("FP8", "NVFP4")
    quant: dict[str, Any]
    if uniform:
        quant = {"quant_algo": None, "kv_cache_quant_algo": algos[0], "exclude_modules": []}
    else:
        quant = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {}, "kv_cache_quant_algo": "MIXED_PRECISION",
                 "kv_cache_quantized_layers": quantized, "kv_cache_schema_version": 1}  # fmt: skip
    config = {"producer": {"name": "kvtool", "version": __version__}, "quantization": quant}
    text = json.dumps(config, indent=2) + "\n"
    files = {"hf_quant_config.json": text.encode(), SCALES_FILE: _safetensors(tensors),
             INDEX_PATCH: _index_patch(tensors)}  # fmt: skip
    data = {**config, "scales": {k: list(v.shape) for k, v in sorted(tensors.items())}}
    return Export(fmt, text, data, notes, files)


# -- vllm-skip-layers -----------------------------------------------------------------------------------------------


def vllm_skip_layers(transform: KVTransform, arch: ArchInfo, sites: ScaleSites | None) -> Export:
    """vLLM's ``--kv-cache-dtype`` and ``--kv-cache-dtype-skip-layers`` for the calibration's choice (one line of
    flags; ``--json``: the dtype, the list and the arguments)."""
    fmt = "vllm-skip-layers"
    layers, notes = engine_layers(transform, fmt)
    _kv_together(layers, fmt)
    dtypes = sorted({k for k, _ in layers if k is not None})
    if len(dtypes) != 1:
        raise UsageError("vLLM takes one --kv-cache-dtype: " + ("no layer is quantized" if not dtypes else
                         "this calibration mixes FP8 and NVFP4 layers; export --to modelopt"))  # fmt: skip
    skipped = [i for i, (k, _) in enumerate(layers) if k is None]
    sliding = [i for i, lt in enumerate(arch.layer_types) if lt == "sliding_attention"]
    skip = ["sliding_window"] if skipped and skipped == sliding else [str(i) for i in skipped]
    args = ["--kv-cache-dtype", dtypes[0]] + (["--kv-cache-dtype-skip-layers", *skip] if skip else [])
    data = {"kv_cache_dtype": dtypes[0], "kv_cache_dtype_skip_layers": skip, "args": args}
    return Export(fmt, " ".join(args) + "\n", data, notes)
