"""``kvtool calibrate``: per-model KV calibration (precision search, non-uniform datatypes, projections) written as
artifact(s)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from kvtool.artifacts import Artifact, check_model, read_artifact, write_artifact
from kvtool.budget import Budget
from kvtool.calibration import SCHEMA, transform_of
from kvtool.calibrators import resolve_budget
from kvtool.calibrators.base import calibration_inputs, calibrator
from kvtool.calibrators.engine_kv import EngineKVCalibration
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
    default_output,
    output_for,
    pick_model,
)
from kvtool.errors import QualityGateError, UsageError
from kvtool.eval.validation import fewest_skipped, validate_transform
from kvtool.models import load_model, model_record

EXAMPLES = """Examples:
  kvtool calibrate                                        # SmolLM2, 3.25 all-in bits -> smollm2-135m.kvcal.safetensors
  kvtool calibrate smollm2-135m --target-bits 3.25 --bits-accounting nominal --validate
  kvtool calibrate --resolve smollm2-135m.kvcal.safetensors --target-bits 2.5   # seconds, no model needed
  kvtool calibrate llama-3-8b --target-bits 3.6 --max-ppl-delta 1.5 -o llama.kvcal.safetensors  # exit 4 on failure
  kvtool calibrate smollm2-135m --method nuq --bits 2,3,4 --validate   # -> smollm2-135m.nuq{2,3,4}.kvcal.safetensors
  kvtool calibrate smollm2-135m --method pca --target-bits 2.0 --validate   # -> smollm2-135m.pca.kvcal.safetensors
  kvtool calibrate smollm2-135m --method svd --target-rank-fraction 0.5
  kvtool calibrate --resolve smollm2-135m.pca.kvcal.safetensors --target-rank-fraction 0.25
  kvtool calibrate smollm2-135m --kv-dtype fp8 --granularity head --validate     # static FP8 scales (vLLM, ModelOpt)
  kvtool calibrate smollm2-135m --kv-dtype nvfp4 --max-ppl-delta 2  # fewest layers kept in bf16 for ΔPPL <= 2 %
  kvtool calibrate smollm2-135m --kv-dtype mixed --target-bits 5.0  # per-layer FP8 / NVFP4 / bf16 (ModelOpt)
"""


METHODS = ("search", "nuq", "pca", "svd", "engine")
DEFAULT_BITS = {"search": 3.25, "pca": 2.0, "svd": 2.0}


#: the calibrators' settings (library errors name them) and the flags that set them
FIELD_FLAGS = {"target_rank_fraction": "--target-rank-fraction", "target_bits": "--target-bits",
               "accounting": "--bits-accounting", "outlier_frac": "--outlier-frac", "sink_tokens": "--sink-tokens",
               "recent_tokens": "--recent-tokens", "fit_skip_recent": "--fit-skip-recent",
               "granularity": "--granularity", "rank_fraction": "--target-rank-fraction", "method": "--method",
               "bits": "--bits", "kv_dtype": "--kv-dtype", "observer": "--observer",
               "skip_budget": "--skip-budget", "sensitivity": "--sensitivity", "kl_tokens": "--kl-tokens"}  # fmt: skip


def _as_flags(error: UsageError, bits_flag: str = "--bits") -> UsageError:
    """A library error, which names settings, reworded with the flags that set them."""
    names = {**FIELD_FLAGS, "bits": bits_flag}
    text = re.sub(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b", lambda m: names[m.group(1)],
                  str(error))  # fmt: skip
    return UsageError(text)


def _budget_from_flags(target_bits: float | None, target_rank_fraction: float | None, accounting: str) -> Budget:
    """The :class:`~kvtool.budget.Budget` the flags ask for."""
    try:
        if target_rank_fraction is not None:
            return Budget(rank_fraction=target_rank_fraction)
        return Budget(bits=DEFAULT_BITS["search"] if target_bits is None else target_bits, accounting=accounting)
    except ValueError as e:
        raise _as_flags(UsageError(str(e)), "--target-bits") from None


def _summary(path: Path, art: Artifact, digest: str) -> dict[str, Any]:
    bits = art.extra["bits"]
    result = {
        "path": str(path),
        "method": art.method["_type"],
        "all_in_bits": bits["all_in"],
        "nominal_bits": bits["nominal"],
        "validation": art.extra["validation"],
        "content_digest": digest,
    }
    if "search" in art.extra:
        data = art.method["_data"]
        result |= {"target_bits": data["target_bits"], "accounting": data["accounting"]}
        result |= {"proxy_error": art.extra["search"]["summary"]["proxy"], "choice": art.extra["search"]["choice"]}
    if "engine" in art.extra:
        data, eng = art.method["_data"], art.extra["engine"]
        result |= {"kv_dtype": data["kv_dtype"], "granularity": data["granularity"], "observer": data["observer"],
                   "skip_layers": eng["skip_layers"], "choice": eng["choice"]}  # fmt: skip
    if "projection" in art.extra:
        result |= {"budget": art.extra["projection"]["budget"], "spectrum": art.extra["projection"]["spectrum"]}
    return result


@handle_errors
def calibrate(
    model: ModelArg = DEFAULT,
    model_opt: ModelOpt = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="search: per-layer precision search; nuq: non-uniform datatypes; pca / svd: projections with "
            "per-component bits; engine: FP8 / NVFP4 scales and skip layers (implied by --kv-dtype).",
        ),
    ] = "search",
    kv_dtype: Annotated[
        str | None,
        typer.Option("--kv-dtype", help="engine: fp8 or nvfp4 in every layer but the skipped ones, or mixed "
                     "(per-layer FP8 / NVFP4 / FP8_K_NVFP4_V / bf16 under --target-bits)."),
    ] = None,
    observer: Annotated[
        str, typer.Option("--observer", help="engine: static scales from the calibration amax; mse: the clip of "
                          "amax x {1, .9, ..., .5} with the least Fisher-weighted error; minmax: llm-compressor's "
                          "default (moving average of per-sequence min/max).")
    ] = "amax",
    sensitivity: Annotated[
        str, typer.Option("--sensitivity", help="engine: rank layers by the Fisher proxy of the passes, or by kl: the "
                          "measured KL of quantizing each layer alone (ModelOpt's score; layers x 3 forward passes).")
    ] = "fisher",
    kl_tokens: Annotated[
        int | None, typer.Option("--kl-tokens", help="engine, --sensitivity kl: measure the per-layer KL on the "
                                 "first N tokens of the first calibration sequence (default: all of it; fewer cost "
                                 "far less time and rank the layers less well).", min=16)
    ] = None,
    skip_budget: Annotated[
        int, typer.Option("--skip-budget", help="engine: layers kept in the model dtype (the most sensitive).", min=0)
    ] = 0,
    target_bits: Annotated[
        float | None,
        typer.Option("--target-bits", help="search, pca, svd, engine: budget in bits per element [3.25 search, "
                     "2.0 pca/svd; engine: all-in, FP8 8, NVFP4 4.5, bf16 16]."),
    ] = None,
    target_rank_fraction: Annotated[
        float | None,
        typer.Option("--target-rank-fraction", help="pca, svd: keep this fraction of components as fp16 instead."),
    ] = None,
    granularity: Annotated[
        str | None,
        typer.Option("--granularity", help="pca, svd: one basis per 'head' or per 'layer' (heads concatenated) "
                     "[layer]; engine: FP8 scales per 'tensor' or per KV 'head' [tensor]."),
    ] = None,
    fit_skip_recent: Annotated[
        int, typer.Option("--fit-skip-recent", help="pca, svd: last tokens of each window left out of the fit.", min=0)
    ] = 0,
    bits_accounting: Annotated[
        str, typer.Option("--bits-accounting", help="search: all-in (codes + scales + zeros + fp16 tokens) or nominal.")
    ] = "all-in",
    bits: Annotated[str, typer.Option("--bits", help="nuq: bit widths, comma-separated (one artifact each).")] = "3",
    outlier_frac: Annotated[
        float, typer.Option("--outlier-frac", help="nuq: fraction of elements kept as fp16 outliers.")
    ] = 0.01,
    qnorm: Annotated[bool, typer.Option("--qnorm", help="nuq: Q-Norm mean/std correction after rounding.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Artifact path (one artifact only).")] = None,
    resolve: Annotated[
        Path | None,
        typer.Option("--resolve", help="Re-solve this artifact's table (precision search or projection) for a "
                     "new budget, without the model."),
    ] = None,
    text: TextOpt = "calibration",
    num_seqs: Annotated[int, typer.Option("--num-seqs", help="Calibration sequences.", min=1)] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.", min=16)] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration window choice.")] = 0,
    sink_tokens: Annotated[int, typer.Option("--sink-tokens", help="First tokens kept in fp16.", min=0)] = 1,
    recent_tokens: Annotated[
        int, typer.Option("--recent-tokens", help="search: most recent tokens kept in fp16.", min=0)
    ] = 0,
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
    """Calibrate KV-cache quantization for a model and write .kvcal.safetensors artifact(s).

    --method search: per-layer key/value quantizers under a bit budget (KVTuner-style, exact solver).
    --method nuq: KVQuant-style non-uniform datatypes with outliers, one artifact per --bits.
    --method pca / svd: calibrated bases (centred PCA / Palu whitened SVD) with per-component bit widths under
    --target-bits (all-in), or kept rank under --target-rank-fraction.
    """
    out = output_for(json_mode, quiet)
    model = pick_model(model, model_opt, DEFAULT)
    if kv_dtype is not None and method == "search":
        method = "engine"  # --kv-dtype names what engines store: the engine calibration
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)} (got '{method}')")
    validate = validate or max_ppl_delta is not None
    lm = None
    checked: dict[str, Any] | None = None
    jobs: list[tuple[Path, Artifact]] = []
    if resolve is not None:
        # only the budget is re-solved: a flag that would change how the table was measured cannot apply
        fixed = {"--method": method != "search", "--kv-dtype": kv_dtype is not None, "--observer": observer != "amax",
                 "--sensitivity": sensitivity != "fisher", "--kl-tokens": kl_tokens is not None,
                 "--skip-budget": bool(skip_budget),
                 "--granularity": granularity is not None, "--bits": bits != "3", "--num-seqs": num_seqs != 8,
                 "--seq-len": seq_len != 2048, "--seed": seed != 0, "--text": text != "calibration"}  # fmt: skip
        if given := [flag for flag, changed in fixed.items() if changed]:
            raise UsageError(f"--resolve re-solves the artifact's budget only; {', '.join(given)} would need a new "
                             "calibration (drop --resolve)")  # fmt: skip
        budget = _budget_from_flags(target_bits, target_rank_fraction, bits_accounting)
        try:
            art, _ = resolve_budget(read_artifact(resolve, expect_schema=SCHEMA), budget)
        except UsageError as e:
            raise _as_flags(e, "--target-bits") from None
        path = output or default_output(art.model.get("id", "model"), f"-{budget.label()}.kvcal.safetensors")
        jobs.append((check_output(path, overwrite), art))
        if validate:
            lm = load_model(model, device, dtype)
            check_model(art, lm.fingerprint)  # validating on another model would be meaningless
    else:
        try:
            widths = sorted({int(b) for b in bits.split(",") if b.strip()})
        except ValueError as e:
            raise UsageError(f"--bits must be comma-separated integers (got '{bits}')") from e
        if method == "nuq" and target_bits is not None:
            raise UsageError("--target-bits applies to search, pca and svd; nuq takes --bits")
        if target_rank_fraction is not None and method not in ("pca", "svd"):
            raise UsageError("--target-rank-fraction applies to --method pca or svd")
        engine_only = (kv_dtype is not None or skip_budget or observer != "amax" or sensitivity != "fisher"
                       or kl_tokens is not None)  # fmt: skip
        if method != "engine" and engine_only:
            raise UsageError("--kv-dtype, --observer, --sensitivity, --kl-tokens and --skip-budget apply to "
                             "--method engine")
        settings: dict[str, Any] = {"num_seqs": num_seqs, "seq_len": seq_len, "seed": seed}
        if method != "engine":  # engines keep no tokens aside
            settings["sink_tokens"] = sink_tokens
        if method == "engine":
            settings |= {"kv_dtype": kv_dtype or "fp8", "granularity": granularity or "tensor", "observer": observer,
                         "sensitivity": sensitivity, "kl_tokens": kl_tokens, "skip_budget": skip_budget,
                         "target_bits": target_bits}  # fmt: skip
        elif method in ("pca", "svd"):
            if target_rank_fraction is None and target_bits is None:
                target_bits = DEFAULT_BITS[method]
            settings |= {"granularity": granularity or "layer", "target_bits": target_bits,
                         "target_rank_fraction": target_rank_fraction, "fit_skip_recent": fit_skip_recent}  # fmt: skip
        elif method == "search":
            settings |= {"target_bits": DEFAULT_BITS["search"] if target_bits is None else target_bits,
                         "accounting": bits_accounting, "recent_tokens": recent_tokens}  # fmt: skip
        else:
            settings |= {"bits": widths, "outlier_frac": outlier_frac, "qnorm": qnorm}
        try:
            cal = calibrator(method, **settings)
        except UsageError as e:
            raise _as_flags(e) from None
        suffixes = cal.outputs()
        if output is not None and len(suffixes) > 1:
            raise UsageError("-o names one artifact; with several --bits, leave it out (names get .nuq<b>)")
        names = {key: output or default_output(model, suffix) for key, suffix in suffixes.items()}
        for p in names.values():
            check_output(p, overwrite)
        lm = load_model(model, device, dtype)
        ids, inputs = calibration_inputs(lm, cal, text)
        out.log(cal.describe(lm.arch) + " ...")
        with out.progress("calibration passes", num_seqs * cal.passes) as advance:
            table = cal.fit(lm, ids, special_prefix=inputs["special_prefix"], progress=advance)
        if isinstance(cal, EngineKVCalibration) and max_ppl_delta is not None and cal.chooses_skips_by_quality():
            out.log(f"choosing the fewest layers to keep in the model dtype for ΔPPL <= {max_ppl_delta:g}% ...")
            cal, checked = fewest_skipped(lm, cal, table, max_ppl_delta, validate_tokens, log=out.log)
        jobs.extend((names[key], art) for key, art in cal.artifacts(model_record(lm), inputs, table).items())
    results = []
    for path, art in jobs:
        if checked is not None:
            art.extra["validation"] = checked  # measured on this very transform by the skip search
        elif validate and lm is not None:
            out.log(f"validating {path.name} on {validate_tokens} held-out tokens ...")
            art.extra["validation"] = validate_transform(lm, transform_of(art), tokens=validate_tokens)
            v = art.extra["validation"]
            out.log(f"held-out PPL {v['ppl']:.3f} vs {v['ppl_original']:.3f}: ΔPPL {v['delta_ppl_pct']:+.2f}%")
        results.append(_summary(path, art, write_artifact(path, art)))
    if out.mode == "human":
        for r, (path, art) in zip(results, jobs, strict=True):
            t = transform_of(art)
            rows = [[i, t.keys[i].label() if t.keys[i] else "-", t.values[i].label() if t.values[i] else "-"]
                    for i in range(len(t.keys))]  # fmt: skip
            cols = ["layer", "keys", "values"]
            if "kv_dtype" in r:  # an engine calibration: each layer's format as the engine names it
                cols.insert(1, "format")
                for row, choice in zip(rows, r["choice"], strict=True):
                    row.insert(1, choice)
            title = f"{path.name}: {r['nominal_bits']:.3f} nominal / {r['all_in_bits']:.3f} all-in bits per element"
            out.show(out.table(title, cols, rows))
    out.result(results[0] if len(results) == 1 else {"artifacts": results}, primary=None)
    if out.mode != "json":
        for r in results:
            out.show(r["path"], highlight=False, markup=False)  # the artifact paths, last
    failed = [r for r in results if max_ppl_delta is not None and r["validation"]["delta_ppl_pct"] > max_ppl_delta]
    if failed:
        r = failed[0]
        raise QualityGateError(
            f"quality gate failed: ΔPPL {r['validation']['delta_ppl_pct']:+.2f}% > {max_ppl_delta:g}% "
            f"(artifact written to {r['path']})"
        )
