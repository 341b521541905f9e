"""``kvtool bench``: one table of named KV configurations on held-out text."""

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
    QuietOpt,
    TextOpt,
    check_output,
    output_for,
    pick_model,
)
from kvtool.errors import KvtoolError, UsageError
from kvtool.eval.bench import BenchSettings, run_bench
from kvtool.eval.presets import BASELINES
from kvtool.eval.rd_plot import plot_rd
from kvtool.models import load_model
from kvtool.texts import load_text

EXAMPLES = """Examples:
  kvtool bench                                   # SmolLM2, Persuasion, all baselines
  kvtool bench smollm2-135m --configs kivi-k4v4,kivi-k4v2-s1 --json
  kvtool bench ./my-model --text my.txt --tokens 4096 --no-continuation
  kvtool bench --configs kivi-k4v4,kvz:q0.5,kvz:smollm2-135m.pca.kvcal.safetensors@1.0,zstd-fp16,cachegen
  kvtool bench --tokens 2048 --configs kvz:q0.5,lmcache-kvtool@2.0,lmcache-fp8   # the LMCache serde's records
"""


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@handle_errors
def bench(
    model: ModelArg = DEFAULT,
    model_opt: ModelOpt = None,
    configs: Annotated[
        str, typer.Option("--configs", help="Comma-separated configurations (see docs/cli.md for the grammar).")
    ] = ",".join(BASELINES),
    text: TextOpt = "evaluation",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens scored for perplexity.", min=2)] = 8192,
    window: Annotated[int, typer.Option("--window", help="Perplexity window (tokens).", min=2)] = 2048,
    continuation: Annotated[
        bool, typer.Option("--continuation/--no-continuation", help="Also measure prefix-cache continuation.")
    ] = True,
    prefix_len: Annotated[int, typer.Option("--prefix-len", help="Continuation: cached prefix tokens.", min=1)] = 2048,
    cont_len: Annotated[int, typer.Option("--cont-len", help="Continuation: scored tokens.", min=1)] = 256,
    offsets: Annotated[str, typer.Option("--offsets", help="Continuation: prefix start offsets.")] = "0,40000,80000",
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also write the rate–distortion picture (PNG; needs matplotlib).")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure size and quality of KV configurations side by side (PPL, ΔPPL, continuation KL, top-1)."""
    out = output_for(json_mode, quiet)
    model = pick_model(model, model_opt, DEFAULT)
    try:
        offs = [int(x) for x in offsets.split(",") if x.strip()]
    except ValueError as e:
        raise UsageError(f"--offsets must be comma-separated integers (got '{offsets}')") from e
    names = [c.strip() for c in configs.split(",") if c.strip()]
    if plot is not None:
        check_output(plot, overwrite=True)
    settings = BenchSettings(text, tokens, window, continuation, prefix_len, cont_len, offs)
    body = load_text(text)
    out.log(f"loading {model} ...")
    lm = load_model(model, device, dtype)
    total = len(names) + 1
    with out.progress("perplexity", total * tokens) as advance:
        result = run_bench(lm, names, body, settings, progress=lambda stage, n: advance(n))
    rows = result["rows"]
    for name, why in result["skipped"].items():
        out.log(f"skipped {name}: {why}")
    table = out.table(
        f"{model}: PPL on {result['ppl_tokens']} tokens of '{text}' (window {window})",
        ["config", "nominal bits", "all-in bits", "PPL", "ΔPPL %", "cont. PPL", "cont. KL", "top-1"],
        [
            [
                r["name"],
                f"{r['nominal_bits']:.2f}",
                f"{r['all_in_bits']:.3f}",
                _fmt(r["ppl"], ".3f"),
                _fmt(r["delta_ppl_pct"], "+.2f"),
                _fmt(r["cont_ppl"], ".3f"),
                _fmt(r["kl"], ".4f"),
                _fmt(r["top1"], ".3f"),
            ]
            for r in rows
        ],
    )
    codecs = [r for r in rows if r["bytes_per_token"] is not None]
    if codecs and out.mode == "human":
        out.show(table)
        table = out.table(
            "codecs (bits = file bytes; speeds = fp16-equivalent MB/s on this machine)",
            ["config", "bytes/token", "vs fp16", "cont. ΔPPL %", "encode MB/s", "decode MB/s"],
            [[r["name"], f"{r['bytes_per_token']:.0f}", f"{r['compression_vs_fp16']:.1f}x",
              f"{100 * (r['cont_ppl'] / rows[0]['cont_ppl'] - 1):+.2f}", f"{r['encode_mb_s']:.1f}",
              f"{r['decode_mb_s']:.1f}"] for r in codecs],
        )  # fmt: skip
    if plot is not None:
        plot_rd(result, plot)
        out.log(f"rate–distortion picture: {plot}")
    out.result(result, table=table)
    failed = [r for r in rows if r["error"] is not None]
    for r in failed:
        out.warning(f"row {r['name']} failed: {r['error']}")
    if failed:  # every other row was measured and printed; the exit status still says the run is incomplete
        raise KvtoolError(f"{len(failed)} of {len(rows)} bench rows failed (first: {failed[0]['name']})")
