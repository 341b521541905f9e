"""``kvtool decode``: turn a ``.kvz`` back into KV tensors, or continue generation from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from kvtool.artifacts import read_artifact, write_artifact
from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
from kvtool.cli._errors import handle_errors
from kvtool.cli._options import (
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    check_output,
    output_file,
    output_for,
)
from kvtool.codecs.kvz import (
    KvzFile,
    check_calibration,
    check_model_of,
    check_tokenizer,
    decode_kvz,
    load_cache,
    recorded_model_spec,
)
from kvtool.kv_capture import capture_artifact
from kvtool.models import cache_kwargs, load_model, special_prefix, tokenize

EXAMPLES = """Examples:
  kvtool decode ctx.kvz -o kv.safetensors                       # plain fp16 K/V (kvtool.kv_capture layout)
  kvtool decode ctx.kvz --generate " And then" --max-new-tokens 32
  kvtool decode ctx.kvz --calibration smollm2-135m.pca.kvcal.safetensors --generate "..."
"""


@handle_errors
def decode(
    path: Annotated[Path, typer.Argument(help="A .kvz file.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the K/V tensors here.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model (default: the one the file records).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="The calibration artifact the file was coded with.")
    ] = None,
    generate: Annotated[
        str | None, typer.Option("--generate", help="Continue from the decoded cache with this text.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.", min=1)] = 32,
    backend: BackendOpt = "auto",
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Decode a .kvz (check it, write K/V tensors with -o, or continue generation with --generate)."""
    out = output_for(json_mode, quiet, output)
    if output is not None:
        check_output(output, overwrite, stdout_ok=True)
    kvz = KvzFile(path)
    cal = read_artifact(calibration, expect_schema=CALIBRATION_SCHEMA) if calibration is not None else None
    lm = load_model(model or recorded_model_spec(kvz), device, dtype)
    check_model_of(kvz, lm.fingerprint)
    check_tokenizer(kvz, lm.tokenizer)
    check_calibration(kvz, cal)
    result: dict = {"path": str(path), "tokens": kvz.tokens, "chunks": len(kvz.chunks), "mode": kvz.settings.mode}
    if generate is not None:
        cache, ids = load_cache(path, lm, cal, backend=backend)
        new = tokenize(lm.tokenizer, generate)
        full = torch.cat([ids, new])[None].to(next(lm.model.parameters()).device)
        with torch.no_grad():
            gen = lm.model.generate(full, **cache_kwargs(lm.model, cache), max_new_tokens=max_new_tokens,
                                    do_sample=False, attention_mask=torch.ones_like(full))  # fmt: skip
        text = lm.tokenizer.decode(gen[0, full.shape[1] :], skip_special_tokens=True)
        result["generated"] = text
        out.log(f"continued {kvz.tokens} cached tokens + {new.numel()} new ones:")
        out.result(result, primary="generated")
        return
    with out.progress("decode", kvz.tokens) as advance:
        layers = decode_kvz(kvz, lm.model, cal, progress=advance, keep_pre_rope=output is not None, backend=backend,
                            device=lm.device)  # fmt: skip
    if output is not None:
        ids = kvz.input_ids()
        art = capture_artifact(
            lm, ids,
            [(d.keys_pre_rope[0], d.keys[0], d.values[0], d.positions) for d in layers],
            "float16", kvz.extra["cache_dtype"], extra={"decoded_from": str(path)},
            special_prefix=special_prefix(lm.tokenizer),
        )  # fmt: skip
        result["output"] = str(output)
        with output_file(output) as target:
            result["content_digest"] = write_artifact(target, art)
    out.result(result, primary="output" if output is not None else "path")
