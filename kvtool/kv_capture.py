"""The ``kvtool.kv_capture`` artifact: a prefix's KV cache, captured from a real model, in plain tensors.

Tensors (stacked over layers; layout ``[layer, kv_head, token, head_dim]``):

* ``k_pre_rope``, ``k``, ``v``: pre-RoPE keys, keys as cached (post-RoPE), values, in ``--store-dtype``;
* ``positions`` ``[layer, token]`` int64: the position of each slot, ``-1`` for padding;
* ``lengths`` ``[layer]`` int64: cached tokens per layer (sliding-window layers keep only the most recent ones;
  their tokens are right-aligned, padding comes first);
* ``input_ids`` ``[token]`` int64: the prefix token ids, as an engine tokenizes the prompt: they start with
  ``inputs.special_prefix``, the ids the tokenizer puts before a prompt (``[bos_token_id]`` or ``[]``; ``null`` for
  a cache decoded from a ``.kvz``, whose ids are the encoded prompt's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtool.artifacts import Artifact, write_artifact
from kvtool.capture import capture_kv
from kvtool.digests import token_digest
from kvtool.errors import InputError, UsageError
from kvtool.models import DTYPES, LoadedModel, model_record, special_prefix, tokenize

SCHEMA = "kvtool.kv_capture"


def save_capture(
    lm: LoadedModel, text: str, tokens: int, path: Path, store_dtype: str = "float16", text_source: str = ""
) -> dict[str, Any]:
    """Prefill the first ``tokens`` tokens of ``text`` tokenized as a prompt (the tokenizer's BOS first, if it adds
    one), write the artifact atomically, return a summary."""
    if store_dtype not in DTYPES:
        raise UsageError(f"--store-dtype must be one of {', '.join(DTYPES)} (got '{store_dtype}')")
    ids = tokenize(lm.tokenizer, text, prompt=True)[:tokens]
    if ids.numel() < tokens:
        raise InputError(f"the text has only {ids.numel()} tokens, fewer than --tokens {tokens}")
    cap = capture_kv(lm.model, ids)
    layers = [(layer.keys_pre_rope[0], layer.keys[0], layer.values[0], layer.positions) for layer in cap.layers]
    art = capture_artifact(lm, ids, layers, store_dtype, str(lm.dtype).removeprefix("torch."),
                           text_source, special_prefix=special_prefix(lm.tokenizer))  # fmt: skip
    digest = write_artifact(path, art)
    return {"path": str(path), "schema": SCHEMA, "tokens": tokens, "bytes": path.stat().st_size, "digest": digest}


def capture_artifact(
    lm: Any,
    ids: torch.Tensor,
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    store_dtype: str,
    compute_dtype: str,
    text_source: str = "",
    extra: dict[str, Any] | None = None,
    special_prefix: list[int] | None = None,
) -> Artifact:
    """The ``kvtool.kv_capture`` artifact of per-layer ``(keys_pre_rope, keys, values, positions)``, each K/V
    ``(kv_heads, n_i, head_dim)`` (``kvtool decode -o`` writes decoded caches in this same layout).

    ``special_prefix`` is recorded as ``inputs.special_prefix``: the ids the tokenizer put before the prompt
    (``ids`` start with them), ``None`` where that is not known."""
    sdt = DTYPES[store_dtype]
    arch = lm.arch
    tokens = int(ids.numel())
    shape = (arch.num_layers, arch.num_kv_heads, tokens, arch.head_dim)
    k_pre, k, v = (torch.zeros(shape, dtype=sdt) for _ in range(3))
    positions = torch.full((arch.num_layers, tokens), -1, dtype=torch.long)
    lengths = torch.zeros(arch.num_layers, dtype=torch.long)
    for i, (kp, kk, vv, pos) in enumerate(layers):
        n = kk.shape[-2]
        k_pre[i, :, tokens - n :] = kp.to("cpu", sdt)
        k[i, :, tokens - n :] = kk.to("cpu", sdt)
        v[i, :, tokens - n :] = vv.to("cpu", sdt)
        positions[i, tokens - n :] = pos.cpu()
        lengths[i] = n
    return Artifact(
        schema=SCHEMA,
        schema_version=1,
        model=model_record(lm),
        inputs={
            "text": text_source,
            "token_ids_digest": token_digest(ids),
            "tokens": tokens,
            "compute_dtype": compute_dtype,
            "special_prefix": special_prefix,
        },
        method={"store_dtype": store_dtype},
        extra={"layout": "[layer, kv_head, token, head_dim]", "tokens_right_aligned": True, **(extra or {})},
        tensors={
            "k_pre_rope": k_pre,
            "k": k,
            "v": v,
            "positions": positions,
            "lengths": lengths,
            "input_ids": ids.clone(),
        },
    )
