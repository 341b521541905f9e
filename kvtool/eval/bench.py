"""``kvtool bench``: evaluate named KV configurations side by side on held-out text.

Each row: nominal and all-in bits per element (at the window length), perplexity with the transform in every
attention layer (prefill included), ΔPPL against the untouched model, and continuation quality of a transformed
prefix cache (KL and top-1 agreement against the untouched cache; the protocol of ``harness``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvtool.artifacts import read_artifact
from kvtool.calibration import SCHEMA, transform_of
from kvtool.errors import UsageError
from kvtool.eval.codec_rows import CodecRow, codec_row, unavailable
from kvtool.eval.configs import parse_config
from kvtool.eval.harness import continuation_quality, perplexity
from kvtool.eval.presets import REFERENCE, parse_preset
from kvtool.models import LoadedModel, special_prefix, tokenize
from kvtool.transforms import KVTransform


@dataclass
class BenchSettings:
    """What ``bench`` measures on, recorded in its JSON output."""

    text: str = "evaluation"
    tokens: int = 8192
    window: int = 2048
    continuation: bool = True
    prefix_len: int = 2048
    cont_len: int = 256
    offsets: list[int] = field(default_factory=lambda: [0, 40000, 80000])


@dataclass
class BenchRow:
    """One configuration. Codec rows (``kvz:...``) have no in-attention PPL (they code a finished prefix cache):
    their bits are measured file bytes, with the codec's encode / decode speeds."""

    name: str
    nominal_bits: float
    all_in_bits: float
    ppl: float | None
    delta_ppl_pct: float | None
    cont_ppl: float | None = None
    kl: float | None = None
    top1: float | None = None
    bytes_per_token: float | None = None
    compression_vs_fp16: float | None = None
    encode_mb_s: float | None = None
    decode_mb_s: float | None = None
    error: str | None = None  #: the row failed (the bench measured the others and reports it)


def config_transform(name: str, lm: LoadedModel) -> KVTransform:
    """The transform a ``--configs`` entry names (:func:`kvtool.eval.configs.parse_config`): a preset
    (``kivi-k4v4``), a calibration artifact (``cal.kvcal.safetensors``), or an artifact re-solved at another budget
    (``cal.kvcal.safetensors@2.5``, ``@2.5n``, ``@r0.5k``, ``@L2``)."""
    entry = parse_config(name)
    if entry.kind != "artifact":
        return parse_preset(name, lm.arch)
    from kvtool.calibrators import resolve_budget

    art = read_artifact(entry.path, expect_schema=SCHEMA, model=lm.fingerprint)
    if entry.budget is not None:
        _, transform = resolve_budget(art, entry.budget)
    else:
        transform = transform_of(art)
    transform.name = name
    return transform


def run_bench(
    lm: LoadedModel,
    configs: Sequence[str],
    text: str,
    settings: BenchSettings,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Measure every configuration; the untouched model (``original``) is always measured first as the reference.

    Perplexity windows and continuation prefixes start with the tokenizer's special prefix (its BOS, if it adds
    one), recorded as ``special_prefix``; continuations get none. ``progress(stage, tokens_done)`` is called as
    work completes.
    """
    ids = tokenize(lm.tokenizer, text)  # text tokens: every window and cached prefix starts with ``prefix``
    ppl_ids = ids[: settings.tokens]
    prefix = special_prefix(lm.tokenizer)
    skipped = {n: why for n in configs if (why := unavailable(n))}
    names = [REFERENCE, *[c for c in configs if c != REFERENCE and c not in skipped]]
    transforms: list[Any] = [codec_row(n, lm) or config_transform(n, lm) for n in names]
    if any(isinstance(t, CodecRow) for t in transforms) and not settings.continuation:
        raise UsageError("codec rows (kvz:..., zstd-fp16) are measured on continuations: drop --no-continuation")
    rows: list[BenchRow] = []
    base_ppl = None
    for name, t in zip(names, transforms, strict=True):
        if isinstance(t, CodecRow):
            rows.append(BenchRow(name, float("nan"), float("nan"), None, None))
            continue

        def advance(n: int, stage: str = name) -> None:
            if progress is not None:
                progress(stage, n)

        r = perplexity(lm.model, ppl_ids, settings.window, t, progress=advance, special_prefix=prefix)
        base_ppl = base_ppl or r.ppl
        bits = t.bits(lm.arch, settings.window)
        rows.append(BenchRow(name, bits["nominal"], bits["all_in"], r.ppl, 100.0 * (r.ppl / base_ppl - 1.0)))
    if settings.continuation:
        conts = continuation_quality(
            lm.model, ids, transforms, settings.prefix_len, settings.cont_len, settings.offsets, prefix
        )
        for row, c, t in zip(rows, conts, transforms, strict=True):
            if c.error is not None:
                row.error = c.error
                continue
            row.cont_ppl, row.kl, row.top1 = c.ppl, c.kl, c.top1
            if isinstance(t, CodecRow):
                row.nominal_bits = row.all_in_bits = t.bits_per_element
                row.bytes_per_token = t.bytes / max(sum(t.prefixes), 1)
                row.compression_vs_fp16 = 16.0 / t.bits_per_element
                row.encode_mb_s, row.decode_mb_s = t.speeds().values()
    return {
        "model": lm.fingerprint,
        "settings": asdict(settings),
        "special_prefix": prefix,
        "ppl_tokens": int(ppl_ids.numel()),
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
    }
