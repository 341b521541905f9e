"""Capture a real rANS symbol stream of SmolLM2 for the GPU benchmark (the GPU host has no model weights).

Prefills the first 2,048 tokens of Persuasion on SmolLM2-135M (CPU), codes every 256-token chunk with the
calibrated coder of a projection artifact at one level, and saves the flat symbols, table ids, lane lengths and
tables the chunks would be coded with::

    python benchmarks/capture_stream.py smollm2-135m.pca.kvcal.safetensors --level 2 -o benchmarks/data/stream.pt
"""

from __future__ import annotations

import argparse

import torch

from kvtool.artifacts import read_artifact
from kvtool.capture import rope_for_positions
from kvtool.codecs import rans
from kvtool.codecs.chunk_coders import batch_layers
from kvtool.codecs.kvz import CodecSettings, Geometry, make_coder, prefill_cache
from kvtool.models import load_model, tokenize
from kvtool.texts import load_text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--level", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("-o", "--output", default="benchmarks/data/stream.pt")
    args = p.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m", "cpu", "float32")
    cal = read_artifact(args.artifact)
    ids = tokenize(lm.tokenizer, load_text("evaluation"), prompt=True)[: args.tokens]
    settings = CodecSettings(mode="calibrated", level=args.level)
    coder = make_coder(settings, cal, lm.arch)
    geo = Geometry(lm.arch, ids.numel(), settings)
    cache = prefill_cache(lm.model, ids)
    rope = rope_for_positions(lm.model, lm.arch.num_layers, torch.arange(ids.numel()))
    syms, tids, lengths = [], [], []
    for chunk in range(geo.num_chunks):
        layers, _ = batch_layers(geo, cache, rope, [chunk])[0]
        s, t, segments = coder.symbols(layers, {})
        syms.append(s)
        tids.append(t)
        lengths.append(rans.lane_lengths(segments, settings.lane_symbols)[0])
    tables = coder._tables({})
    elements = ids.numel() * lm.arch.num_layers * 2 * lm.arch.num_kv_heads * lm.arch.head_dim
    torch.save(
        {
            "symbols": torch.cat(syms).to(torch.uint8),
            "table_ids": torch.cat(tids).to(torch.int16),
            "lengths": torch.cat(lengths).to(torch.int32),
            "freq": tables.freq.to(torch.int16),
            "elements": elements,
            "level_bits": coder.level.bits,
            "arch": lm.arch.to_dict(),
        },
        args.output,
    )
    print(f"{args.output}: {torch.cat(syms).numel()} symbols for {elements} KV elements, {tables.freq.shape[0]} tables")


if __name__ == "__main__":
    main()
