"""Does the precision search's sensitivity proxy predict real ΔPPL? Rank correlation over random configurations.

Usage: python benchmarks/proxy_rank_correlation.py ARTIFACT [--configs 30] [--tokens 4096] [--seed 0] [--json OUT]

Each random configuration picks, for every layer's keys and values independently, one candidate of that slot's
Pareto set with 2 to 8 bits. Its proxy is the sum of the measured slot errors (what the solver minimises); its ΔPPL
is measured on held-out *Persuasion* with the transform in every attention layer. Prints Spearman's rho.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from kvtool import config as kvconfig
from kvtool.artifacts import read_artifact
from kvtool.calibration import SCHEMA
from kvtool.calibrators.precision_search import choice_summary, choice_transform, table_from
from kvtool.eval.harness import perplexity
from kvtool.models import load_model, special_prefix, tokenize
from kvtool.texts import load_text


def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    art = read_artifact(args.artifact, expect_schema=SCHEMA)
    search = kvconfig.from_dict(art.method)
    table, _ = table_from(art.extra, art.tensors)
    lm = load_model(art.model["id"])
    ids = tokenize(lm.tokenizer, load_text("evaluation"))[: args.tokens]
    prefix = special_prefix(lm.tokenizer)
    base = perplexity(lm.model, ids, 2048, special_prefix=prefix).ppl
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in range(args.configs):
        choice = {}
        for k in ("k", "v"):
            par = table.pareto(k, "all-in")
            nominal = table.bits[k]["nominal"]
            choice[k] = [
                int(rng.choice(np.flatnonzero(par[i] & (nominal[i] >= 2) & (nominal[i] <= 8))))
                for i in range(len(table.weights))
            ]
        s = choice_summary(table, choice)
        ppl = perplexity(lm.model, ids, 2048, choice_transform(search, table, choice), special_prefix=prefix).ppl
        rows.append(
            {
                "proxy": s["proxy"],
                "all_in": s["all_in"],
                "nominal": s["nominal"],
                "delta_ppl_pct": 100 * (ppl / base - 1),
            }
        )
        print(
            f"{n:3d} proxy {s['proxy']:10.1f}  all-in {s['all_in']:.3f}  ΔPPL {rows[-1]['delta_ppl_pct']:+7.2f}%",
            file=sys.stderr,
            flush=True,
        )
    rho = spearman([r["proxy"] for r in rows], [r["delta_ppl_pct"] for r in rows])
    rho_bits = spearman([-r["all_in"] for r in rows], [r["delta_ppl_pct"] for r in rows])
    result = {
        "spearman_proxy_vs_dppl": rho,
        "spearman_fewer_bits_vs_dppl": rho_bits,
        "base_ppl": base,
        "tokens": int(ids.numel()),
        "configs": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "configs"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
