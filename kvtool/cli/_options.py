"""Options shared by every command (one definition, reused)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.cli._output import Output
from kvtool.errors import UsageError
from kvtool.models import DEFAULT_MODEL

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: alias (smollm2-135m, llama-3-8b, ...), hub id in the local HF cache, folder, or .gguf."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
BackendOpt = Annotated[
    str, typer.Option("--backend", help="Entropy coder: auto (Triton on CUDA), torch or triton; the same bytes.")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the primary result.")]
TextOpt = Annotated[
    str,
    typer.Option(
        "--text",
        help="Text: 'evaluation' (Persuasion), 'calibration' (Emma + Mansfield Park), a book name, a file, or '-'.",
    ),
]

OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]

DEFAULT = DEFAULT_MODEL


def check_output(path: Path, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``--overwrite`` (outputs are written atomically anyway)."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise UsageError(f"output folder {path.parent} does not exist")
    return path


def default_output(model: str, suffix: str) -> Path:
    """``<model name><suffix>`` in the current folder (alias, hub id tail, or folder/file stem)."""
    name = Path(model.rstrip("/")).name
    for ext in (".gguf", ".safetensors"):
        name = name.removesuffix(ext)
    return Path(f"{name}{suffix}")


def output_for(json_mode: bool, quiet: bool) -> Output:
    """The :class:`Output` for the flags given (``--json`` and ``-q`` exclude each other)."""
    if json_mode and quiet:
        raise UsageError("--json and --quiet cannot be used together")
    return Output("json" if json_mode else "quiet" if quiet else "human")
