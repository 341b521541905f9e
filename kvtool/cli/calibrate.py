"""``kvtool calibrate``: layer-wise K/V precision search under a bit budget, written as one artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.artifacts import check_model, read_artifact, write_artifact
from kvtool.calibration import SCHEMA, calibration_artifact, model_record, validate_transform
from kvtool.calibrators.precision_search import (
    PrecisionSearch,
    build_transform,
    measure_candidates,
    resolve_artifact,
    search_extra,
    solve,
    table_tensors,
)
from kvtool.cli._errors import handle_errors
from kvtool.cli._options import (
    DEFAULT,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OverwriteOpt,
    QuietOpt,
    TextOpt,
    check_output,
    default_output,
    output_for,
)
from kvtool.digests import token_digest
from kvtool.errors import QualityGateError
from kvtool.models import load_model, tokenize
from kvtool.texts import load_text

EXAMPLES = """Examples:
  kvtool calibrate                                        # SmolLM2, 3.25 all-in bits -> smollm2-135m.kvcal.safetensors
  kvtool calibrate smollm2-135m --target-bits 3.25 --bits-accounting nominal --validate
  kvtool calibrate --resolve smollm2-135m.kvcal.safetensors --target-bits 2.5   # seconds, no model needed
  kvtool calibrate llama-3-8b --target-bits 3.6 --max-ppl-delta 1.5 -o llama.kvcal.safetensors  # exit 4 on failure
"""


@handle_errors
def calibrate(
    model: ModelArg = DEFAULT,
    target_bits: Annotated[float, typer.Option("--target-bits", help="Budget in bits per K/V element.")] = 3.25,
    bits_accounting: Annotated[
        str, typer.Option("--bits-accounting", help="all-in (codes + scales + zeros + fp16 tokens) or nominal.")
    ] = "all-in",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Artifact path.")] = None,
    resolve: Annotated[
        Path | None, typer.Option("--resolve", help="Re-solve this artifact's measured table for a new budget.")
    ] = None,
    text: TextOpt = "calibration",
    num_seqs: Annotated[int, typer.Option("--num-seqs", help="Calibration sequences.", min=1)] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.", min=16)] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration window choice.")] = 0,
    sink_tokens: Annotated[int, typer.Option("--sink-tokens", help="First tokens kept in fp16.", min=0)] = 1,
    recent_tokens: Annotated[int, typer.Option("--recent-tokens", help="Most recent tokens kept in fp16.", min=0)] = 0,
    validate: Annotated[bool, typer.Option("--validate", help="Measure ΔPPL on held-out text (Persuasion).")] = False,
    validate_tokens: Annotated[int, typer.Option("--validate-tokens", help="Held-out tokens.", min=2)] = 8192,
    max_ppl_delta: Annotated[
        float | None, typer.Option("--max-ppl-delta", help="Quality gate in % ΔPPL (implies --validate; exit 4).")
    ] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Search per-layer key and value quantizers under a bit budget; write a .kvcal.safetensors artifact."""
    out = output_for(json_mode, quiet)
    search = PrecisionSearch(
        target_bits=target_bits, accounting=bits_accounting, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
        num_seqs=num_seqs, seq_len=seq_len, seed=seed,
    )  # fmt: skip
    validate = validate or max_ppl_delta is not None
    lm = None
    if resolve is not None:
        art, transform = resolve_artifact(read_artifact(resolve, expect_schema=SCHEMA), target_bits, bits_accounting)
        path = output or default_output(art.model.get("id", "model"), f"-{target_bits:g}b.kvcal.safetensors")
        check_output(path, overwrite)
        if validate:
            lm = load_model(model, device, dtype)
            check_model(art, lm.fingerprint)  # validating on another model would be meaningless
    else:
        path = check_output(output or default_output(model, ".kvcal.safetensors"), overwrite)
        lm = load_model(model, device, dtype)
        ids = tokenize(lm.tokenizer, load_text(text))
        out.log(
            f"measuring {len(search.candidates('k')) + len(search.candidates('v'))} candidates per layer on "
            f"{num_seqs} x {seq_len} tokens of '{text}' ..."
        )
        with out.progress("fisher passes", num_seqs) as advance:
            table = measure_candidates(lm.model, lm.arch, ids, search, progress=advance)
        choice = solve(table, target_bits, bits_accounting)
        transform = build_transform(search, table, choice)
        inputs = {
            "text": text,
            "token_ids_digest": token_digest(ids),
            "tokens": int(ids.numel()),
            "num_seqs": num_seqs,
            "seq_len": seq_len,
            "seed": seed,
        }
        art = calibration_artifact(
            model_record(lm),
            search,
            inputs,
            transform,
            search_extra(table, choice),
            table_tensors(table, choice),
            seq_len,
        )
    if validate and lm is not None:
        out.log(f"validating on {validate_tokens} held-out tokens ...")
        art.extra["validation"] = validate_transform(lm, transform, tokens=validate_tokens)
    digest = write_artifact(path, art)
    summary = art.extra["search"]["summary"]
    result = {
        "path": str(path),
        "target_bits": target_bits,
        "accounting": bits_accounting,
        "all_in_bits": summary["all_in"],
        "nominal_bits": summary["nominal"],
        "proxy_error": summary["proxy"],
        "validation": art.extra["validation"],
        "content_digest": digest,
        "choice": art.extra["search"]["choice"],
    }
    rows = [[i, k, v] for i, (k, v) in enumerate(zip(result["choice"]["k"], result["choice"]["v"], strict=True))]
    table_view = out.table(
        f"{path.name}: {summary['nominal']:.3f} nominal / {summary['all_in']:.3f} all-in bits per element",
        ["layer", "keys", "values"], rows,
    )  # fmt: skip
    if art.extra["validation"]:
        v = art.extra["validation"]
        out.log(f"held-out PPL {v['ppl']:.3f} vs {v['ppl_original']:.3f}: ΔPPL {v['delta_ppl_pct']:+.2f}%")
    out.result(result, primary="path", table=table_view)
    if max_ppl_delta is not None and art.extra["validation"]["delta_ppl_pct"] > max_ppl_delta:
        raise QualityGateError(
            f"quality gate failed: ΔPPL {art.extra['validation']['delta_ppl_pct']:+.2f}% > {max_ppl_delta:g}% "
            f"(artifact written to {path})"
        )
