"""``kvtool export``: write a calibration's per-layer choices in a format another tool reads.

The file contents go to stdout (nothing else), or atomically to ``-o FILE``; what the format cannot represent is
one ``lossy export: ...`` warning on stderr. The formats themselves live in :mod:`kvtool.exports`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvtool.arch import ArchInfo
from kvtool.atomic import write_bytes_atomic
from kvtool.calibration import load_calibration
from kvtool.cli._errors import handle_errors
from kvtool.cli._options import JsonOpt, OverwriteOpt, QuietOpt, check_output, is_stdout, output_for
from kvtool.errors import ArtifactError, UsageError
from kvtool.exports import FORMATS
from kvtool.exports import export as export_transform


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
    """Export a calibration to KVTuner's per-layer YAML, engines' per-layer dtype ranges, or transformers'
    QuantizedCache config (see docs/exports.md).

    Without -o the file contents are printed on stdout (with --json, their JSON form); with -o the file is
    written and its path printed. What the format cannot represent is warned on stderr ("lossy export: ...").

    Examples: kvtool export cal.safetensors --to kvtuner-yaml -o llama_kvtuner.yaml;
    kvtool export cal.safetensors --to layer-dtypes --json;
    kvtool export cal.safetensors --to hf-cache-config > cache_config.json
    """
    out = output_for(json_mode, quiet)
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
    result = export_transform(to, transform, arch)
    if result.lossy:
        out.warning("lossy export: " + "; ".join(result.lossy))
    if output is None:
        text = json.dumps(result.data, indent=2) + "\n" if json_mode else result.text
        out.raw(text)
        return
    size = _write_atomic(output, result.text)
    out.log(f"wrote {to} ({size} bytes) to {output}")
    out.result({"path": str(output), "format": to, "bytes": size, "lossy": result.lossy}, primary="path")
