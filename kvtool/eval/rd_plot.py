"""Rate–distortion picture of a ``kvtool bench`` result: all-in bits per element vs continuation ΔPPL, one curve per
method family (``bench --plot rd.png``). Needs matplotlib (``pip install 'kvtool[plot]'``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvtool.errors import UsageError
from kvtool.eval.configs import parse_config


def family(name: str) -> str:
    """The curve a row belongs to: ``kvz:A.kvcal.safetensors@L2`` → ``kvz A``, ``kvz:q0.5`` → ``kvz adaptive``,
    ``kivi-k3v3`` → ``kivi``, ``A.kvcal.safetensors@2.5`` → ``A`` (:attr:`kvtool.eval.configs.ConfigEntry.family`)."""
    return parse_config(name).family


def plot_rd(result: dict[str, Any], path: Path) -> None:
    """Write the picture atomically (temporary file in the same folder, then rename)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("--plot needs matplotlib: pip install 'kvtool[plot]'") from e
    rows = result["rows"]
    ref = rows[0]["cont_ppl"]
    if ref is None:
        raise UsageError("--plot needs the continuation measurement (drop --no-continuation)")
    curves: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows[1:]:
        if r["cont_ppl"] is None:
            continue
        curves.setdefault(family(r["name"]), []).append((r["all_in_bits"], 100 * (r["cont_ppl"] / ref - 1), r["name"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("all-in bits per element (log scale)")
    ax.set_ylabel("continuation ΔPPL % (log scale)")
    ax.set_title(
        f"{result['model'].get('id', '')}: rate–distortion ({result['settings']['prefix_len']}-token prefixes)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
