"""``kvtool inspect``: what any kvtool artifact is, for which model, made how, with per-layer tables.

Plain safetensors files (no kvtool metadata) are listed tensor by tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact, describe, dtype_bytes, read_artifact, read_header
from kvtool.calibration import transform_of
from kvtool.cli._errors import handle_errors
from kvtool.cli._options import JsonOpt, QuietOpt, output_for
from kvtool.codecs.kvz import SCHEMA as KVZ_SCHEMA
from kvtool.codecs.kvz import KvzFile
from kvtool.errors import ArtifactError
from kvtool.models import model_fingerprint


def _capture_layers(a: Artifact) -> tuple[list[str], list[list[Any]]]:
    types = a.model.get("arch", {}).get("layer_types", [])
    per_tok = a.tensors["k"][0, :, 0].numel() * a.tensors["k"].element_size()
    rows = [
        [i, types[i] if i < len(types) else "?", int(n), int(n) * per_tok, int(n) * per_tok]
        for i, n in enumerate(a.tensors["lengths"].tolist())
    ]
    return ["layer", "type", "tokens", "K bytes", "V bytes"], rows


def _calibration_layers(a: Artifact) -> tuple[list[str], list[list[Any]]]:
    t = transform_of(a)
    arch = ArchInfo.from_dict(a.model["arch"])
    bits = t.bits(arch, int(a.extra.get("bits", {}).get("context_len", 2048)))["layers"]

    def label(x: Any) -> str:
        return "-" if x is None else x.label()

    rows = [
        [i, label(t.keys[i]), label(t.values[i]), f"{b['k_all_in']:.3f}", f"{b['v_all_in']:.3f}"]
        for i, b in enumerate(bits)
    ]
    cols = ["layer", "keys", "values", "K all-in bits", "V all-in bits"]
    spectrum = a.extra.get("projection", {}).get("spectrum")
    if spectrum:  # projections: kept rank, variance kept, and the rank that holds 90 % of the variance
        for kind in ("k", "v"):
            for row, s in zip(rows, spectrum[kind], strict=True):
                row += [f"{s['rank']}/{s['dims']}", f"{s['energy_kept']:.4f}", s["rank90"]]
            cols += [f"{kind.upper()} rank", f"{kind.upper()} energy", f"{kind.upper()} rank90"]
    engine = a.extra.get("engine")
    if engine:  # engine formats: the layer's choice, its static scales and the calibration amax
        for i, row in enumerate(rows):
            row.insert(1, engine["choice"][i])
            for kind, slot in (("k", t.keys[i]), ("v", t.values[i])):
                row += [_scale_text(getattr(slot, "scale", None)), f"{float(a.tensors[f'{kind}_amax'][i].max()):.4g}"]
        cols.insert(1, "choice")
        cols += ["K scale", "K amax", "V scale", "V amax"]
    return cols, rows


def _scale_text(scale: Any) -> str:
    """A static scale: its value, or the range of its per-head values; ``-`` when none (model dtype, dynamic)."""
    if scale is None:
        return "-"
    values = scale.flatten().tolist()
    return f"{values[0]:.4g}" if len(values) == 1 else f"{min(values):.4g}..{max(values):.4g} ({len(values)} heads)"


#: schema -> per-layer table builder
LAYER_TABLES: dict[str, Callable[[Artifact], tuple[list[str], list[list[Any]]]]] = {
    "kvtool.kv_capture": _capture_layers,
    "kvtool.kv_calibration": _calibration_layers,
}


def _plain(path: Path) -> dict[str, Any]:
    header = read_header(path)
    tensors = {
        name: {
            "dtype": info["dtype"],
            "shape": info["shape"],
            "bytes": math.prod(info["shape"]) * dtype_bytes(info["dtype"]),
        }
        for name, info in sorted(header.items())
        if name != "__metadata__"
    }
    return {"path": str(path), "kind": "safetensors", "metadata": header.get("__metadata__", {}), "tensors": tensors}


@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="A kvtool artifact or any safetensors file.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Also check that the artifact was made for this model (exit 3 if not)."),
    ] = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Describe a kvtool artifact (validating it fully) or list the tensors of a plain safetensors file.

    With --model, also refuse (exit 3) an artifact made for another model.
    """
    out = output_for(json_mode, quiet)
    header = read_header(path)
    if "kvtool" not in header.get("__metadata__", {}):
        info = _plain(path)
        rows = [[n, t["dtype"], "x".join(map(str, t["shape"])) or "()", t["bytes"]] for n, t in info["tensors"].items()]
        table = out.table(
            f"{path}: plain safetensors ({len(rows)} tensors)", ["tensor", "dtype", "shape", "bytes"], rows
        )
        out.result(info | {"schema": None}, primary="kind", table=table)
        return
    art = read_artifact(path, model=model_fingerprint(model) if model else None)
    if art.schema == KVZ_SCHEMA:
        KvzFile(path)  # the .kvz schema's own checks (geometry, tensor dtypes and shapes), not just the container
    info = {"path": str(path), "kind": "kvtool", **describe(art)}
    cols, rows = [], []
    if art.schema in LAYER_TABLES:
        try:
            cols, rows = LAYER_TABLES[art.schema](art)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ArtifactError(f"{path}: malformed {art.schema} content ({type(e).__name__}: {e})") from None
        info["layers"] = [dict(zip(cols, r, strict=True)) for r in rows]
    if out.mode == "human":
        m = art.model
        out.show(
            f"[bold]{path}[/bold]: {art.schema} v{art.schema_version} (by {art.producer.get('name')} "
            f"{art.producer.get('version')})"
        )
        out.show(
            f"model: {m.get('id')}  config {m.get('config_digest', '')[:19]}  "
            f"weights {m.get('weights_digest', '')[:19]}",
            highlight=False,
        )
        for k, v in art.inputs.items():
            out.show(f"input {k}: {v}", highlight=False, markup=False)
        method = art.method.get("_data", art.method)
        name = art.method.get("_type", "method")
        out.show(f"{name}: " + ", ".join(f"{k}={v}" for k, v in method.items()), highlight=False, markup=False)
        for key in ("bits", "validation"):
            if art.extra.get(key):
                out.show(f"{key}: {art.extra[key]}", highlight=False, markup=False)
        out.show(f"content digest: {art.content_digest}", highlight=False)
        tensor_rows = [
            [n, str(t.dtype).removeprefix("torch."), "x".join(map(str, t.shape))]
            for n, t in sorted(art.tensors.items())
        ]
        out.show(out.table("tensors", ["tensor", "dtype", "shape"], tensor_rows))
        if rows:
            out.show(out.table("per layer", cols, rows))
        return
    out.result(info, primary="schema")
