"""The runtime cache (``kvtool.runtime``): generation with per-layer quantized K/V, on tiny models of every arch."""

from __future__ import annotations

import pytest
import torch

from kvtool.arch import arch_info, invert_rope
from kvtool.capture import capture_kv
from kvtool.models import cache_kwargs
from kvtool.quantizers import UniformQuantizer as U
from kvtool.runtime import TransformedCache
from kvtool.transforms import KVTransform


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_commit_schedule_and_quantization_grid(tiny_llama) -> None:
    tiny_llama = tiny_llama.model
    """KIVI-style schedule: 1 sink committed in fp16, then whole 16-token key groups once older than the 8-token
    recent window, each quantized exactly as the quantizer does on the model's pre-RoPE keys."""
    kvt = KVTransform.uniform(
        arch_info(tiny_llama.config).num_layers, U(2, "channel", 16), U(2, "token"), sink_tokens=1, recent_tokens=8
    )
    with TransformedCache(tiny_llama, kvt) as cache:
        tiny_llama(input_ids=_ids(50), **cache_kwargs(tiny_llama, cache), use_cache=True)
        layer = cache.layers[0]
        # 50 tokens: 1 sink, then (49 - 8) // 16 = 2 groups of 16 committed, 17 tokens in the tail.
        assert layer.committed[0].shape[-2] == 33 and layer.tail[0].shape[-2] == 17
        assert cache.get_seq_length() == 50
        # The committed groups are exactly the 2-bit quantization of the model's own pre-RoPE keys of those tokens
        # (float32; the rotation there and back costs ~1e-6).
        ref = capture_kv(tiny_llama, _ids(50)).layers[0]
        pre = invert_rope(layer.committed[0], ref.cos[..., :33, :], ref.sin[..., :33, :])
        for g in (slice(1, 17), slice(17, 33)):
            expected = U(2, "channel", 16).apply(ref.keys_pre_rope[..., g, :])
            torch.testing.assert_close(pre[..., g, :], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.committed[0][..., :1, :], ref.keys[..., :1, :].half().float())
        # one more decode step: the tail grows by one, nothing new is committed until a group is complete
        tiny_llama(input_ids=_ids(1, 1), **cache_kwargs(tiny_llama, cache), use_cache=True)
        assert layer.committed[0].shape[-2] == 33 and layer.tail[0].shape[-2] == 18


@pytest.mark.parametrize("bits", [8, 2], ids=["int8", "int2"])
def test_generate_runs_on_every_arch(tiny, bits: int) -> None:
    """``model.generate`` runs with the cache on Llama, Mistral (sliding), Qwen2 and Gemma3 (mixed layers); the
    sliding layers keep at most ``window - 1`` tokens."""
    model, arch = tiny.model, tiny.info
    kvt = KVTransform.uniform(arch.num_layers, U(bits, "channel", 4), U(bits, "token"), sink_tokens=1)
    with TransformedCache(model, kvt) as cache:
        out = model.generate(_ids(20), max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
    assert out.shape == (1, 26)
    for i, layer in enumerate(cache.layers):
        if arch.layer_types[i] == "sliding_attention":
            assert layer.keys.shape[-2] <= arch.sliding_window - 1


@torch.no_grad()
def test_high_precision_cache_matches_plain_generation(tiny_llama) -> None:
    tiny_llama = tiny_llama.model
    plain = tiny_llama.generate(_ids(24), max_new_tokens=8, do_sample=False)
    kvt = KVTransform.uniform(2, U(8, "channel", 4), U(8, "token"))
    with TransformedCache(tiny_llama, kvt) as cache:
        got = tiny_llama.generate(_ids(24), max_new_tokens=8, do_sample=False, **cache_kwargs(tiny_llama, cache))
    assert torch.equal(plain, got)


def test_close_removes_hooks(tiny_llama) -> None:
    tiny_llama = tiny_llama.model
    before = sum(len(m._forward_pre_hooks) for m in tiny_llama.modules())
    cache = TransformedCache(tiny_llama, KVTransform.uniform(2, U(4), U(4)))
    assert sum(len(m._forward_pre_hooks) for m in tiny_llama.modules()) > before
    cache.close()
    assert sum(len(m._forward_pre_hooks) for m in tiny_llama.modules()) == before
