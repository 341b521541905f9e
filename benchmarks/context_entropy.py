"""Would a context-conditioned entropy model pay in the calibrated ``.kvz`` codec? (issue 16, item 3)

The calibrated coder entropy-codes each component's symbols with one static table (the artifact's codec level).
This measures, on real SmolLM2 KV and without changing the format, what three models would spend on the same
symbols, as ideal code lengths in bits per KV element (all symbols of every layer, K and V; fp16 raw positions and
side information excluded, so only the relative differences matter):

* ``static``: the artifact's table of the level (what a ``.kvz`` spends today, less the rANS overhead);
* ``own order-0``: each component's empirical entropy on the evaluated prefix itself (an oracle: the best any
  per-component static table could do on this text);
* ``prev-symbol``: P(s_t | s_{t-1}) per component, s_{t-1} the previous token's symbol of the same component in the
  chunk (what a lane sees just before, in the codec's component-major layout), fitted on a *training* prefix with
  add-½ smoothing and evaluated on a disjoint prefix; ``prev-bucket``: the same with the previous symbol bucketed
  by magnitude (|s−K| = 0, 1, 2, 3+: four contexts, little to fit).

    python benchmarks/context_entropy.py smollm2-135m.pca.kvcal.safetensors --levels 1,2,3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from kvtool.artifacts import read_artifact
from kvtool.capture import rope_for_positions
from kvtool.codecs.chunk_coders import batch_layers
from kvtool.codecs.coding import KINDS
from kvtool.codecs.kvz import CodecSettings, Geometry, make_coder, prefill_cache
from kvtool.models import load_model, tokenize
from kvtool.texts import load_text


def symbols_of(lm, cal, level: int, ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:  # noqa: ANN001
    """Per chunk, layer and kind: (symbols (n, comps) int64, global component ids (comps,)); and the coder."""
    settings = CodecSettings(mode="calibrated", level=level, sink_tokens=0)
    coder = make_coder(settings, cal, lm.arch)
    geo = Geometry(lm.arch, ids.numel(), settings)
    cache = prefill_cache(lm.model, ids)
    rope = rope_for_positions(lm.model, lm.arch.num_layers, torch.arange(ids.numel()))
    out = []
    for chunk in range(geo.num_chunks):
        layers, _ = batch_layers(geo, cache, rope, [chunk])[0]
        for i, (k, v) in enumerate(layers):
            for kind, x in zip(KINDS, (k, v), strict=True):
                s, _ = coder._symbols(i, kind, x, {})
                out.append((s.to(torch.int64), coder._coded(i, kind, {})))
    return out, coder


def measure(train, test, coder, alphabet: int) -> dict[str, float]:  # noqa: ANN001
    level = coder.level
    n_comp = level.step.numel()
    kmax = level.kmax.to(torch.int64)
    freq = level.freq.to(torch.float64)
    bucket = lambda s, k: (s - k).abs().clamp_max(3)  # noqa: E731
    # fitted conditional counts (train): per component, previous symbol (or bucket), symbol
    prev_counts = torch.zeros(n_comp, alphabet, alphabet, dtype=torch.float64)
    buck_counts = torch.zeros(n_comp, 4, alphabet, dtype=torch.float64)
    for s, comps in train:
        if s.shape[0] < 2:
            continue
        a, b = s[:-1], s[1:]  # (n-1, c)
        cidx = comps[None, :].expand_as(a)
        ones = torch.ones(a.numel(), dtype=torch.float64)
        prev_counts.index_put_((cidx.reshape(-1), a.reshape(-1), b.reshape(-1)), ones, accumulate=True)
        bk = bucket(a, kmax[comps][None, :])
        buck_counts.index_put_((cidx.reshape(-1), bk.reshape(-1), b.reshape(-1)), ones, accumulate=True)
    live = torch.arange(alphabet)[None, :] <= (2 * kmax)[:, None]  # (N, A) symbols a component can take

    def cond_bits(counts: torch.Tensor) -> torch.Tensor:
        c = counts + 0.5 * live[:, None, :]
        return -torch.log2(c / c.sum(-1, keepdim=True)).nan_to_num(0.0)
    pb, bb = cond_bits(prev_counts), cond_bits(buck_counts)
    static_bits = -torch.log2(freq / freq.sum(1, keepdim=True).clamp_min(1)).nan_to_num(0.0)  # (N, A)
    tot = {"static": 0.0, "own_order0": 0.0, "prev_symbol": 0.0, "prev_bucket": 0.0}
    own = torch.zeros(n_comp, alphabet, dtype=torch.float64)
    for s, comps in test:
        n = s.shape[0]
        if n == 0:
            continue
        cidx = comps[None, :].expand_as(s)
        tot["static"] += float(static_bits[cidx, s].sum())
        own.index_put_((cidx.reshape(-1), s.reshape(-1)), torch.ones(s.numel(), dtype=torch.float64), accumulate=True)
        first = static_bits[comps, s[0]].sum()  # the first token of a chunk has no previous symbol: static table
        rest_p = pb[cidx[1:], s[:-1], s[1:]].sum() if n > 1 else 0.0
        rest_b = bb[cidx[1:], bucket(s[:-1], kmax[comps][None, :]), s[1:]].sum() if n > 1 else 0.0
        tot["prev_symbol"] += float(first + rest_p)
        tot["prev_bucket"] += float(first + rest_b)
    p = own / own.sum(1, keepdim=True).clamp_min(1)
    tot["own_order0"] = float(-(own * torch.log2(p.clamp_min(1e-300))).sum())
    return tot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m", "cpu", "float32")
    cal = read_artifact(args.artifact)
    ids = tokenize(lm.tokenizer, load_text("evaluation"), prompt=True)
    train_ids, test_ids = ids[: args.tokens], ids[40_000 : 40_000 + args.tokens]
    elements = args.tokens * lm.arch.num_layers * 2 * lm.arch.num_kv_heads * lm.arch.head_dim
    rows = []
    for level in [int(x) for x in args.levels.split(",")]:
        train, coder = symbols_of(lm, cal, level, train_ids)
        test, _ = symbols_of(lm, cal, level, test_ids)
        alphabet = int(2 * coder.level.kmax.max()) + 1
        tot = measure(train, test, coder, alphabet)
        row = {"level": level, **{k: v / elements for k, v in tot.items()}}
        row["prev_symbol_saving_pct"] = 100 * (1 - tot["prev_symbol"] / tot["static"])
        row["prev_bucket_saving_pct"] = 100 * (1 - tot["prev_bucket"] / tot["static"])
        row["own_order0_saving_pct"] = 100 * (1 - tot["own_order0"] / tot["static"])
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"artifact": args.artifact, "tokens": args.tokens, "rows": rows}, indent=1))
    return 0 if all(math.isfinite(r["static"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
