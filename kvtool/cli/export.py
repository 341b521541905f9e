"""``kvtool export``: write a calibration's per-layer choices in a format another tool reads.

The file contents go to stdout (nothing else), or atomically to ``-o FILE``; formats of several files (a config
and a safetensors file of scales) are written atomically as the folder ``-o DIR``. What the format cannot
represent is one ``lossy export: ...`` warning on stderr. The formats themselves live in :mod:`kvtool.exports`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvtool.arch import ArchInfo
from kvtool.atomic import write_bytes_atomic, write_folder_atomic
from kvtool.calibration import load_calibration
from kvtool.cli._errors import handle_errors
from kvtool.cli._options import JsonOpt, OverwriteOpt, QuietOpt, check_output, is_stdout, output_for
from kvtool.errors import ArtifactError, UsageError
from kvtool.exports import FORMATS, REMOVED
from kvtool.exports import export as export_transform
from kvtool.exports.engines import scale_sites


def _write_atomic(path: Path, text: str) -> int:
    data = text.encode()
    write_bytes_atomic(path, data)
    return len(data)


@handle_errors
def export(
    artifact: Annotated[Path, typer.Argument(help="A calibration artifact (from kvtool calibrate).")],
    to: Annotated[str, typer.Option("--to", help=f"Format: {', '.join(FORMATS)}.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write this file (atomically) instead of stdout.")
    ] = None,
    overwrite: OverwriteOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a calibration to KVTuner's per-layer YAML, transformers' QuantizedCache config, or what serving
    engines load: compressed-tensors or ModelOpt KV scales, vLLM's skip-layer flags (see docs/exports.md).

    Without -o the file contents are printed on stdout (with --json, their JSON form); with -o the file is
    written and its path printed. compressed-tensors and modelopt are folders (a config, the scales, an index
    patch): they need -o DIR. What the format cannot represent is warned on stderr ("lossy export: ...").

    Examples: kvtool export cal.safetensors --to kvtuner-yaml -o llama_kvtuner.yaml;
    kvtool export fp8.kvcal.safetensors --to compressed-tensors -o llama-fp8-kv/;
    vllm serve llama $(kvtool export fp8.kvcal.safetensors --to vllm-skip-layers)
    """
    out = output_for(json_mode, quiet)
    if to in REMOVED:
        raise UsageError(f"export format '{to}' was removed: {REMOVED[to]}")
    if to not in FORMATS:
        raise UsageError(f"unknown export format '{to}' (expected one of: {', '.join(FORMATS)})")
    if is_stdout(output):  # `-o -` is what no -o does already
        output = None
    if output is not None:
        check_output(output, overwrite)
    art, transform = load_calibration(artifact)
    try:
        arch = ArchInfo.from_dict(art.model["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{artifact}: malformed model architecture record ({type(e).__name__}: {e})") from e
    result = export_transform(to, transform, arch, scale_sites(art))
    if result.files and output is None and not json_mode:
        raise UsageError(f"--to {to} writes a folder ({', '.join(result.files)}): give -o DIR")
    if result.lossy:
        out.warning("lossy export: " + "; ".join(result.lossy))
    if result.files and output is not None:
        write_folder_atomic(output, result.files, overwrite=overwrite)
        size = sum(len(b) for b in result.files.values())
        out.log(f"wrote {to} ({len(result.files)} files, {size} bytes) to {output}/")
        out.result({"path": str(output), "format": to, "bytes": size, "files": sorted(result.files),
                    "lossy": result.lossy}, primary="path")  # fmt: skip
        return
    if output is None:
        text = json.dumps(result.data, indent=2) + "\n" if json_mode else result.text
        out.raw(text)
        return
    size = _write_atomic(output, result.text)
    out.log(f"wrote {to} ({size} bytes) to {output}")
    out.result({"path": str(output), "format": to, "bytes": size, "lossy": result.lossy}, primary="path")
