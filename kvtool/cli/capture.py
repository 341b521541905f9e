"""``kvtool capture``: prefill a text and save the model's KV cache as a ``kvtool.kv_capture`` artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.cli._errors import handle_errors
from kvtool.cli._options import (
    DEFAULT,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    ModelOpt,
    OverwriteOpt,
    QuietOpt,
    TextOpt,
    check_output,
    output_file,
    output_for,
    pick_model,
)
from kvtool.kv_capture import save_capture
from kvtool.models import load_model
from kvtool.texts import load_text


@handle_errors
def capture(
    model: ModelArg = DEFAULT,
    model_opt: ModelOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file.")] = Path("kv.safetensors"),
    overwrite: OverwriteOpt = False,
    text: TextOpt = "evaluation",
    tokens: Annotated[
        int, typer.Option("--tokens", help="Tokens to prefill (from the start of the text).", min=1)
    ] = 1024,
    store_dtype: Annotated[str, typer.Option("--store-dtype", help="float16, bfloat16 or float32.")] = "float16",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prefill TEXT and write its KV cache (pre-RoPE keys, cached keys, values) to one artifact."""
    out = output_for(json_mode, quiet, output)
    model = pick_model(model, model_opt, DEFAULT)
    check_output(output, overwrite, stdout_ok=True)
    body = load_text(text)
    lm = load_model(model, device, dtype)
    out.log(f"prefilling {tokens} tokens of '{text}' on {lm.fingerprint['id']} ...")
    with output_file(output) as target:
        info = save_capture(lm, body, tokens, target, store_dtype, text_source=text)
    info["path"] = str(output)
    table = out.table(
        None,
        ["artifact", "schema", "tokens", "bytes", "content digest"],
        [[info["path"], info["schema"], info["tokens"], info["bytes"], info["digest"]]],
    )
    out.result(info, primary="path", table=table)
