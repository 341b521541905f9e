"""Options shared by every command (one definition, reused)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
#: the same spelling as encode/decode: ``-m MODEL`` works in every command (the positional MODEL stays too)
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model, as in encode/decode (instead of the positional MODEL)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


def pick_model(positional: str, option: str | None, default: str) -> str:
    """The model a command was given: ``-m MODEL`` or the positional MODEL (not both)."""
    if option is None:
        return positional
    if positional != default:
        raise UsageError(f"the model is given twice ('{positional}' and -m '{option}'): give one")
    return option
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Entropy coder: auto (Triton on CUDA, else numba on CPU), torch, numba or triton; the same bytes.",
    ),
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


def is_stdout(path: Path | None) -> bool:
    """``-o -``: the output byte stream goes to stdout."""
    return path is not None and str(path) == "-"


def check_output(path: Path, overwrite: bool, stdout_ok: bool = False) -> Path:
    """Refuse to replace an existing output unless ``--overwrite`` (outputs are written atomically anyway).
    ``-`` (stdout) is accepted where the command's output is one byte stream (``stdout_ok``), never onto a
    terminal."""
    if is_stdout(path):
        if not stdout_ok:
            raise UsageError("this command writes files: -o - (stdout) is not supported, give a path")
        if sys.stdout.isatty():
            raise UsageError("-o - would write binary data to the terminal: redirect stdout or give a path")
        return path
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


def output_for(json_mode: bool, quiet: bool, output: Path | None = None) -> Output:
    """The :class:`Output` for the flags given (``--json`` and ``-q`` exclude each other). With ``-o -`` stdout
    carries the output bytes, so results go to stderr and ``--json`` is refused."""
    if json_mode and quiet:
        raise UsageError("--json and --quiet cannot be used together")
    if json_mode and is_stdout(output):
        raise UsageError("--json prints on stdout, where -o - writes the output: use one of them")
    return Output("json" if json_mode else "quiet" if quiet else "human", results_to_stderr=is_stdout(output))


@contextmanager
def output_file(path: Path) -> Iterator[Path]:
    """The file to write ``path``'s content to. For ``-`` a temporary file, copied to stdout only once the
    command has written it whole (a failure sends nothing); any other path is used as it is."""
    if not is_stdout(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kvtool-stdout-") as tmp:
        staged = Path(tmp) / "output"
        yield staged
        with open(staged, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
