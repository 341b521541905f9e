"""``kvtool encode``: prefill a prompt and store its KV cache as a compact ``.kvz`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.artifacts import read_artifact
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
from kvtool.codecs.kvz import CodecSettings, encode_prefix, pick_level
from kvtool.errors import UsageError
from kvtool.eval.rate_target import QualityTarget, choose_rate
from kvtool.models import DEFAULT_MODEL, load_model, tokenize
from kvtool.texts import load_text

EXAMPLES = """Examples:
  kvtool encode prompt.txt -o ctx.kvz                                      # adaptive (no calibration)
  kvtool encode prompt.txt -o ctx.kvz --calibration smollm2-135m.pca.kvcal.safetensors --bits 1.0
  kvtool encode prompt.txt -o ctx.kvz --lossless                           # exact bytes back
  kvtool encode prompt.txt -o ctx.kvz --calibration A.kvcal.safetensors --max-kl 0.02   # cheapest level meeting it
"""


@handle_errors
def encode(
    prompt: Annotated[str, typer.Argument(help="Prompt: a text file, '-' (stdin), or a book name (e.g. persuasion).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .kvz file.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model (alias, hub id, folder or .gguf).")
    ] = DEFAULT_MODEL,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="Projection artifact (calibrate --method pca|svd).")
    ] = None,
    bits: Annotated[
        float | None, typer.Option("--bits", help="With --calibration: richest codec level within B all-in bits.")
    ] = None,
    level: Annotated[int | None, typer.Option("--level", help="With --calibration: codec level index.")] = None,
    quality: Annotated[
        float, typer.Option("--quality", help="Without --calibration: step in standard deviations per channel.")
    ] = 0.5,
    lossless: Annotated[bool, typer.Option("--lossless", help="Exact cache bytes (byte planes + zstandard).")] = False,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Keep the first N prompt tokens.", min=1)
    ] = None,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", help="Tokens per chunk.", min=1)] = 256,
    sink_tokens: Annotated[int, typer.Option("--sink-tokens", help="First positions kept in fp16.", min=0)] = 1,
    recent_tokens: Annotated[int, typer.Option("--recent-tokens", help="Last positions kept in fp16.", min=0)] = 0,
    max_kl: Annotated[
        float | None, typer.Option("--max-kl", help="Cheapest rate whose KL per position, measured on the prompt's "
                                   "last --probe-tokens tokens, is at most K (exit 4 if none).")  # fmt: skip
    ] = None,
    max_ppl_delta: Annotated[
        float | None, typer.Option("--max-ppl-delta", help="Same, with the probe's perplexity increase in percent.")
    ] = None,
    probe_tokens: Annotated[int, typer.Option("--probe-tokens", help="Prompt tokens held out to measure.")] = 64,
    probe_margin: Annotated[
        float, typer.Option("--probe-margin", help="The probe must meet the target times this (the text that "
                            "follows is not the probe).")  # fmt: skip
    ] = 0.6,
    backend: BackendOpt = "auto",
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prefill PROMPT and write its KV cache as a .kvz file (transform + entropy coding, or lossless)."""
    out = output_for(json_mode, quiet, output)
    check_output(output, overwrite, stdout_ok=True)
    if lossless and (calibration is not None or bits is not None or level is not None):
        raise UsageError("--lossless takes no --calibration, --bits or --level")
    if calibration is None and (bits is not None or level is not None):
        raise UsageError("--bits and --level choose a calibrated codec level: give --calibration too")
    if bits is not None and level is not None:
        raise UsageError("give --bits or --level, not both")
    quality_target = None
    if max_kl is not None or max_ppl_delta is not None:
        if bits is not None or level is not None:
            raise UsageError("--max-kl / --max-ppl-delta choose the rate: not with --bits or --level")
        if lossless:
            raise UsageError("--max-kl and --max-ppl-delta choose a lossy rate: not with --lossless")
        quality_target = QualityTarget(max_kl, max_ppl_delta, probe_tokens, probe_margin)
    cal = read_artifact(calibration, expect_schema=CALIBRATION_SCHEMA) if calibration is not None else None
    if lossless:
        mode, lv = "lossless", -1
    elif cal is not None:
        mode = "calibrated"
        if quality_target is not None:  # the level is what the quality target chooses
            lv = -1
        else:
            lv = level if level is not None else pick_level(cal, bits if bits is not None else 1.0)
    else:
        mode, lv = "adaptive", -1
    settings = CodecSettings(mode=mode, level=lv, quality=quality, chunk_tokens=chunk_tokens,  # type: ignore[arg-type]
                             sink_tokens=sink_tokens, recent_tokens=recent_tokens)  # fmt: skip
    text = load_text(prompt)
    lm = load_model(model, device, dtype)
    ids = tokenize(lm.tokenizer, text, prompt=True)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    report = None
    if quality_target is not None:
        out.log(f"measuring candidate rates on the prompt's last {min(probe_tokens, ids.numel())} tokens ...")
        settings, report = choose_rate(lm, ids, settings, cal, quality_target)
        chosen = report["chosen"]
        which = f"level {chosen['level']}" if mode == "calibrated" else f"quality {chosen['quality']}"
        out.log(f"chose {which}: probe KL {chosen['kl']:.4g}, ΔPPL {chosen['ppl_delta_pct']:+.2f} % "
                f"({len(report['tried'])} probes, {report['probe_s']:.1f} s)")  # fmt: skip
    out.log(f"prefilling {ids.numel()} tokens on {lm.fingerprint['id']} and coding ({mode}) ...")
    with out.progress("encode", int(ids.numel())) as advance:
        with output_file(output) as target:
            info = encode_prefix(lm, ids, settings, target, cal, progress=advance, backend=backend)
    info["path"] = str(output)
    if report is not None:
        info["quality_target"] = report
    rows = [[info["path"], info["tokens"], info["bytes"], f"{info['bits_per_element']:.3f}",
             f"{info['compression_vs_fp16']:.1f}x", f"{info['overhead_pct']:.2f}%"]]  # fmt: skip
    table = out.table(None, ["file", "tokens", "bytes", "bits/element", "vs fp16", "overhead"], rows)
    out.result(info, primary="path", table=table)
