"""The ``kvtool.kv_capture`` artifact: a prefix's KV cache, captured from a real model, in plain tensors.

Tensors (stacked over layers; layout ``[layer, kv_head, token, head_dim]``):

* ``k_pre_rope``, ``k``, ``v``: pre-RoPE keys, keys as cached (post-RoPE), values, in ``--store-dtype``;
* ``positions`` ``[layer, token]`` int64: the position of each slot, ``-1`` for padding;
* ``lengths`` ``[layer]`` int64: cached tokens per layer (sliding-window layers keep only the most recent ones;
  their tokens are right-aligned, padding comes first);
* ``input_ids`` ``[token]`` int64: the prefix token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtool.artifacts import Artifact, write_artifact
from kvtool.capture import capture_kv
from kvtool.digests import token_digest
from kvtool.errors import InputError, UsageError
from kvtool.models import DTYPES, LoadedModel, tokenize

SCHEMA = "kvtool.kv_capture"


def save_capture(
    lm: LoadedModel, text: str, tokens: int, path: Path, store_dtype: str = "float16", text_source: str = ""
) -> dict[str, Any]:
    """Prefill the first ``tokens`` tokens of ``text``, write the artifact atomically, return a summary."""
    if store_dtype not in DTYPES:
        raise UsageError(f"--store-dtype must be one of {', '.join(DTYPES)} (got '{store_dtype}')")
    ids = tokenize(lm.tokenizer, text)[:tokens]
    if ids.numel() < tokens:
        raise InputError(f"the text has only {ids.numel()} tokens, fewer than --tokens {tokens}")
    cap = capture_kv(lm.model, ids)
    sdt = DTYPES[store_dtype]
    a = lm.arch
    shape = (a.num_layers, a.num_kv_heads, tokens, a.head_dim)
    k_pre, k, v = (torch.zeros(shape, dtype=sdt) for _ in range(3))
    positions = torch.full((a.num_layers, tokens), -1, dtype=torch.long)
    lengths = torch.zeros(a.num_layers, dtype=torch.long)
    for i, layer in enumerate(cap.layers):
        n = layer.keys.shape[-2]
        k_pre[i, :, tokens - n :] = layer.keys_pre_rope[0].to("cpu", sdt)
        k[i, :, tokens - n :] = layer.keys[0].to("cpu", sdt)
        v[i, :, tokens - n :] = layer.values[0].to("cpu", sdt)
        positions[i, tokens - n :] = layer.positions.cpu()
        lengths[i] = n
    art = Artifact(
        schema=SCHEMA,
        schema_version=1,
        model={**lm.fingerprint, "arch": a.to_dict()},
        inputs={
            "text": text_source,
            "token_ids_digest": token_digest(ids),
            "tokens": tokens,
            "compute_dtype": str(lm.dtype).removeprefix("torch."),
        },
        method={"store_dtype": store_dtype},
        extra={"layout": "[layer, kv_head, token, head_dim]", "tokens_right_aligned": True},
        tensors={
            "k_pre_rope": k_pre,
            "k": k,
            "v": v,
            "positions": positions,
            "lengths": lengths,
            "input_ids": ids.clone(),
        },
    )
    digest = write_artifact(path, art)
    return {"path": str(path), "schema": SCHEMA, "tokens": tokens, "bytes": path.stat().st_size, "digest": digest}
