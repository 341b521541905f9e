"""Calibration statistics shared by every calibrator: K/V on calibration text and their Fisher information.

For each calibration sequence, one forward and one backward pass of the summed next-token loss give, per layer,
the pre-RoPE keys and the values as attention reads them, and the gradient of the loss with respect to each of
their elements. The squared gradient is the diagonal empirical Fisher information that KVQuant (arXiv:2401.18079,
§3.4) uses to weight quantization error: ``Σ g² (x̂ - x)²`` approximates, to second order, the loss increase a
quantizer causes. Statistics are yielded per sequence so callers accumulate what they need: one sequence's
statistics in memory at a time. A method that reads the data more than once (:class:`FisherPasses`) re-reads it
from a temporary spill of the first pass on a CPU (deleted when it is done; KVQuant keeps a 32 GiB Fisher
checkpoint) and recomputes it on an accelerator.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvtool.arch import invert_rope, rope_transpose
from kvtool.attention import intercepted_attention
from kvtool.errors import InputError
from kvtool.models import with_prefix


@dataclass
class LayerStats:
    """One layer on one calibration sequence; every tensor ``(batch, kv_heads, seq, head_dim)``, float32, on the
    model's device (a GPU calibration measures its candidates there; only tables reach the host).

    ``keys`` are pre-RoPE and ``key_grad`` the gradient with respect to them, unless the stats were asked for
    post-RoPE (``fisher_stats(..., post_rope=True)``: the keys the cache holds, the gradient with respect to those).
    """

    keys: torch.Tensor
    key_grad: torch.Tensor
    values: torch.Tensor
    value_grad: torch.Tensor


def calibration_windows(
    token_ids: torch.Tensor, seq_len: int, num_seqs: int, seed: int, special_prefix: Sequence[int] = ()
) -> list[torch.Tensor]:
    """``num_seqs`` sequences of ``seq_len`` tokens, each ``(seq_len,)``: ``special_prefix`` (the tokenizer's BOS, if
    it adds one: :func:`kvtool.models.special_prefix`) followed by ``seq_len - len(special_prefix)`` text tokens
    taken at seeded random, non-overlapping slots of the text tokens ``token_ids``."""
    text_len = seq_len - len(special_prefix)
    if text_len < 1:
        raise InputError(f"--seq-len {seq_len} leaves no room for text after the special prefix {list(special_prefix)}")
    slots = token_ids.numel() // text_len
    if slots < num_seqs:
        raise InputError(
            f"the calibration text has {token_ids.numel()} tokens: too few for {num_seqs} sequences of {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(slots, generator=gen)[:num_seqs].sort().values
    return [with_prefix(special_prefix, token_ids[int(p) * text_len : (int(p) + 1) * text_len]) for p in picks]


def fisher_stats(model: Any, windows: list[torch.Tensor], post_rope: bool = False) -> Iterator[list[LayerStats]]:
    """Yield, per calibration window (shape ``(seq,)``), the :class:`LayerStats` of every layer (keys pre-RoPE, or
    as the cache holds them with ``post_rope``: what engines quantize)."""
    device = next(model.parameters()).device
    grads_were = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def keep(layer: int, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        key.retain_grad()
        value.retain_grad()
        seen[layer] = (key, value, cos, sin)
        return key, value

    try:
        for ids in windows:
            ids = ids[None].to(device)
            seen.clear()
            with torch.enable_grad(), intercepted_attention(model, keep):
                # A leaf input that requires grad makes autograd track the whole network, so every K/V gradient
                # includes all paths through later layers.
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits[0, :-1].float()
                F.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
            stats = []
            for layer in sorted(seen):
                key, value, cos, sin = seen[layer]
                stats.append(
                    LayerStats(
                        keys=(key.detach() if post_rope else invert_rope(key.detach(), cos, sin)).float(),
                        key_grad=(key.grad if post_rope else rope_transpose(key.grad, cos, sin)).float(),
                        values=value.detach().float(),
                        value_grad=value.grad.float(),
                    )
                )
            seen.clear()
            del logits, embeds
            yield stats
    finally:
        for p, was in zip(model.parameters(), grads_were, strict=True):
            p.requires_grad_(was)


class FisherPasses:
    """The Fisher statistics of ``windows``, read once per iteration (a pass), one sequence at a time.

    With ``spill`` (default: the model is on the CPU, where a forward and backward pass is the cost of a
    calibration), the first pass also writes each sequence's statistics to a temporary folder (``TMPDIR``;
    float32, exactly what was computed) and later passes read them back; without it (an accelerator, where a pass
    costs less than moving the statistics to a disk), later passes recompute them, which gives the same values.
    If the spill cannot be written (a full disk, no writable ``TMPDIR``), later passes recompute. Use as a context
    manager: the folder is removed on exit.
    """

    def __init__(self, model: Any, windows: list[torch.Tensor], post_rope: bool = False,
                 spill: bool | None = None) -> None:  # fmt: skip
        self.model, self.windows, self.post_rope = model, windows, post_rope
        self.spill = next(model.parameters()).device.type == "cpu" if spill is None else spill
        self._folder: Path | None = None
        self._spilled = 0  #: sequences written by the first pass

    def __enter__(self) -> FisherPasses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __iter__(self) -> Iterator[list[LayerStats]]:
        if self._spilled == len(self.windows) and self._folder is not None:
            for i in range(len(self.windows)):
                saved = torch.load(self._folder / f"{i}.pt", weights_only=True)
                yield [LayerStats(*t) for t in saved]
            return
        writing = self.spill and self._folder is None
        if writing:
            try:
                self._folder = Path(tempfile.mkdtemp(prefix="kvtool-fisher-"))
            except OSError:  # no writable TMPDIR: later passes recompute
                writing = False
        for i, stats in enumerate(fisher_stats(self.model, self.windows, post_rope=self.post_rope)):
            if writing:
                try:
                    torch.save([(s.keys, s.key_grad, s.values, s.value_grad) for s in stats],
                               self._folder / f"{i}.pt")  # type: ignore[operator]  # fmt: skip
                    self._spilled = i + 1
                except OSError:
                    writing = False
                    self.close()  # later passes recompute
            yield stats


def accumulate(
    model: Any,
    token_ids: torch.Tensor,
    seq_len: int,
    num_seqs: int,
    seed: int,
    add: Callable[[list[LayerStats]], None],
    progress: Callable[[int], None] | None = None,
    special_prefix: Sequence[int] = (),
) -> None:
    """Run the Fisher passes over the seeded calibration windows (see :func:`calibration_windows`) and hand each
    sequence's stats to ``add``."""
    for stats in fisher_stats(model, calibration_windows(token_ids, seq_len, num_seqs, seed, special_prefix)):
        add(stats)
        if progress:
            progress(1)
