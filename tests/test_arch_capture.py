"""Architecture facts and KV capture on random-weight tiny models of every supported architecture.

The central check: the pre-RoPE keys that :func:`kvtool.capture.capture_kv` recovers by rotating the cached keys
back (with the ``(cos, sin)`` each layer was observed to use) equal the true pre-RoPE keys, read independently
with test-only forward hooks on the architecture's own modules (``k_proj`` for Llama / Mistral / Qwen2, the
output of ``self_attn.k_norm`` for Gemma3, whose keys are normalised before RoPE).

Tolerance (all float32): RoPE and its inverse are per-pair 2x2 rotations computed in fp32, each output element
a sum of two products, so every step adds a relative error of a few ulp (fp32 eps = 1.2e-7) of the key magnitude;
``cos² + sin²`` differs from 1 by a few ulp too. Round trips therefore land within ~1e-6 relative of the key
magnitudes: on these models |k| <= ~5 and the largest error measured is 4.8e-7 (one ulp at 4). ``atol = rtol =
1e-5`` leaves a >10x margin and is still far below any real discrepancy (a wrong angle, a wrong theta, a missing
norm or a position off by one gives O(0.1-1) errors).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from tiny_models import (
    EXPECTED_LAYER_TYPES,
    EXPECTED_SLIDING_WINDOW,
    FULL_THETA,
    HEAD_DIM,
    KV_HEADS,
    SLIDING_THETA,
)

from kvtool.arch import FULL, SLIDING, apply_rope, invert_rope
from kvtool.capture import KVCapture, capture_kv

ATOL = 1e-5
RTOL = 1e-5
SEQ = 24


def _ids(seed: int = 0, n: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n,), generator=g)


def _attn_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in model.model.layers]


@contextmanager
def true_kv_hooks(arch: str, model: Any) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """Record, per layer, the true pre-RoPE keys and the values ``(batch, kv_heads, seq, head_dim)``.

    Keys: ``k_proj``'s output reshaped like the modeling code does for Llama / Mistral / Qwen2; the output of
    ``k_norm`` (already in head layout, applied right before RoPE) for Gemma3. Values: ``v_proj``'s output.
    """
    keys: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    handles = []

    def heads(out: torch.Tensor) -> torch.Tensor:
        b, t, _ = out.shape
        return out.detach().view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2).clone()

    for i, attn in enumerate(_attn_modules(model)):
        if arch == "gemma3":
            handles.append(attn.k_norm.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, out.clone())))
        else:
            handles.append(attn.k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, heads(out))))
        handles.append(attn.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, heads(out))))
    try:
        yield keys, values
    finally:
        for h in handles:
            h.remove()


def _capture_with_truth(tiny: Any, seed: int = 0) -> tuple[KVCapture, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    with true_kv_hooks(tiny.arch, tiny.model) as (keys, values):
        cap = capture_kv(tiny.model, _ids(seed))
    return cap, keys, values


def _expected_len(layer_type: str, sliding_window: int | None) -> int:
    # DynamicSlidingWindowLayer keeps the last ``sliding_window - 1`` tokens.
    return min(SEQ, sliding_window - 1) if layer_type == SLIDING else SEQ


# -- arch_info -----------------------------------------------------------------------------------------------------


def test_arch_info_geometry(tiny: Any) -> None:
    info = tiny.info
    expected_types = EXPECTED_LAYER_TYPES[tiny.arch]
    assert info.num_layers == len(expected_types) == len(tiny.model.model.layers)
    assert info.num_kv_heads == KV_HEADS
    assert info.num_heads == 4
    assert info.head_dim == HEAD_DIM
    assert info.hidden_size == 64
    assert info.vocab_size == 128
    assert info.layer_types == expected_types
    assert info.sliding_window == EXPECTED_SLIDING_WINDOW[tiny.arch]
    assert info.rope_style == "half"
    assert info.kv_elements_per_token() == 2 * len(expected_types) * KV_HEADS * HEAD_DIM


def test_arch_info_layer_types_match_modules(tiny: Any) -> None:
    """The config-derived layer types agree with what each attention module actually does."""
    for i, attn in enumerate(_attn_modules(tiny.model)):
        module_window = getattr(attn, "sliding_window", None) or getattr(attn.config, "sliding_window", None)
        if tiny.info.layer_types[i] == SLIDING:
            assert module_window == tiny.info.sliding_window
        elif tiny.arch == "gemma3":  # Gemma3's full layers have no window of their own
            assert attn.sliding_window is None


def test_arch_info_gemma3_rope_per_layer_type(tiny_gemma3: Any) -> None:
    rope = tiny_gemma3.info.rope
    assert rope[SLIDING]["rope_theta"] == SLIDING_THETA
    assert rope[FULL]["rope_theta"] == FULL_THETA


def test_arch_info_digest_is_stable(tiny: Any, tiny_llama: Any) -> None:
    assert tiny.info.digest() == tiny.info.digest()
    if tiny.arch != "llama":
        assert tiny.info.digest() != tiny_llama.info.digest()


# -- capture shapes and positions ----------------------------------------------------------------------------------


def test_capture_shapes_and_positions(tiny: Any) -> None:
    cap = capture_kv(tiny.model, _ids())
    assert len(cap.layers) == tiny.info.num_layers
    assert cap.input_ids.shape == (1, SEQ)
    for i, layer in enumerate(cap.layers):
        n = _expected_len(tiny.info.layer_types[i], tiny.info.sliding_window)
        shape = (1, KV_HEADS, n, HEAD_DIM)
        assert layer.keys_pre_rope.shape == shape, f"layer {i}"
        assert layer.keys.shape == shape, f"layer {i}"
        assert layer.values.shape == shape, f"layer {i}"
        assert layer.cos.shape == layer.sin.shape == (1, n, HEAD_DIM), f"layer {i}"
        assert layer.positions.dtype == torch.int64
        assert torch.equal(layer.positions, torch.arange(SEQ - n, SEQ)), f"layer {i}"
        assert layer.keys.dtype == layer.keys_pre_rope.dtype == torch.float32


def test_capture_batched_input_equals_unbatched(tiny_llama: Any) -> None:
    a = capture_kv(tiny_llama.model, _ids())
    b = capture_kv(tiny_llama.model, _ids()[None])
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys)
        assert torch.equal(la.keys_pre_rope, lb.keys_pre_rope)


# -- the key test: captured pre-RoPE keys are the true ones --------------------------------------------------------


def test_captured_pre_rope_keys_equal_true_keys(tiny: Any) -> None:
    """Captured pre-RoPE keys == the keys read by hooks on k_proj (Gemma3: k_norm), sliced to the cached tokens.

    Tolerance atol = rtol = 1e-5 in float32: see the module docstring (fp32 rotation round trip, ~1e-6).
    """
    cap, true_keys, _ = _capture_with_truth(tiny)
    assert sorted(true_keys) == list(range(tiny.info.num_layers))
    for i, layer in enumerate(cap.layers):
        n = layer.keys.shape[-2]
        truth = true_keys[i][:, :, SEQ - n :, :]
        assert truth.abs().max() > 0.1, "keys too small for a meaningful comparison"
        torch.testing.assert_close(layer.keys_pre_rope, truth, atol=ATOL, rtol=RTOL, msg=f"layer {i}")


def test_captured_values_equal_true_values(tiny: Any) -> None:
    """Values are cached untouched: bit-for-bit the v_proj output (last n tokens for sliding layers)."""
    cap, _, true_values = _capture_with_truth(tiny)
    for i, layer in enumerate(cap.layers):
        n = layer.values.shape[-2]
        assert torch.equal(layer.values, true_values[i][:, :, SEQ - n :, :]), f"layer {i}"


def test_gemma3_true_keys_are_normed_not_raw_projection(tiny_gemma3: Any) -> None:
    """Guard on the test itself: Gemma3's k_norm is not the identity, so hooking k_proj would be wrong."""
    model = tiny_gemma3.model
    raw: dict[int, torch.Tensor] = {}
    attn = _attn_modules(model)[1]  # a full layer: all tokens cached
    h = attn.k_proj.register_forward_hook(
        lambda m, a, out: raw.__setitem__(1, out.detach().view(1, SEQ, KV_HEADS, HEAD_DIM).transpose(1, 2))
    )
    try:
        cap = capture_kv(model, _ids())
    finally:
        h.remove()
    assert (cap.layers[1].keys_pre_rope - raw[1]).abs().max() > 0.1


def test_reapplying_rope_reproduces_cached_keys(tiny: Any) -> None:
    """apply_rope(captured pre-RoPE keys, captured cos/sin) == cached keys; atol = rtol = 1e-5 (fp32 rotation)."""
    cap = capture_kv(tiny.model, _ids())
    for i, layer in enumerate(cap.layers):
        again = apply_rope(layer.keys_pre_rope, layer.cos, layer.sin)
        torch.testing.assert_close(again, layer.keys, atol=ATOL, rtol=RTOL, msg=f"layer {i}")


def test_rope_on_true_keys_reproduces_cached_keys(tiny: Any) -> None:
    """Rotating the hook-observed keys with the recorded cos/sin gives the cached keys (fp32, atol = rtol = 1e-5):
    the recorded rotation is the one the model applied."""
    cap, true_keys, _ = _capture_with_truth(tiny)
    for i, layer in enumerate(cap.layers):
        n = layer.keys.shape[-2]
        rotated = apply_rope(true_keys[i][:, :, SEQ - n :, :], layer.cos, layer.sin)
        torch.testing.assert_close(rotated, layer.keys, atol=ATOL, rtol=RTOL, msg=f"layer {i}")


def test_invert_rope_round_trip_random() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 16, generator=g)
    ang = torch.rand(2, 10, 8, generator=g) * 100
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    torch.testing.assert_close(invert_rope(apply_rope(x, cos, sin), cos, sin), x, atol=ATOL, rtol=RTOL)
    # Scaled cos/sin (YaRN's attention factor) are inverted too.
    torch.testing.assert_close(invert_rope(apply_rope(x, 1.3 * cos, 1.3 * sin), 1.3 * cos, 1.3 * sin), x)


# -- recorded RoPE -------------------------------------------------------------------------------------------------


def _default_cos_sin(theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[None], emb.sin()[None]


def test_recorded_cos_sin_match_theta(tiny: Any) -> None:
    """Each layer's recorded rotation is standard RoPE with its layer type's theta at the cached positions."""
    cap = capture_kv(tiny.model, _ids())
    rope = tiny.info.rope
    for i, layer in enumerate(cap.layers):
        params = rope.get(tiny.info.layer_types[i], rope)
        cos, sin = _default_cos_sin(params["rope_theta"], layer.positions)
        torch.testing.assert_close(layer.cos, cos, atol=ATOL, rtol=RTOL, msg=f"layer {i}")
        torch.testing.assert_close(layer.sin, sin, atol=ATOL, rtol=RTOL, msg=f"layer {i}")


def test_gemma3_sliding_and_full_layers_use_different_rope(tiny_gemma3: Any) -> None:
    cap = capture_kv(tiny_gemma3.model, _ids())
    types = tiny_gemma3.info.layer_types
    sliding = types.index(SLIDING)
    full = types.index(FULL)
    n = cap.layers[sliding].cos.shape[-2]
    # Same positions (the last n), different theta: different angles.
    assert torch.equal(cap.layers[sliding].positions, cap.layers[full].positions[-n:])
    cos_full = cap.layers[full].cos[:, -n:, :]
    sin_full = cap.layers[full].sin[:, -n:, :]
    assert (cap.layers[sliding].cos - cos_full).abs().max() > 0.1
    assert (cap.layers[sliding].sin - sin_full).abs().max() > 0.1
    # Layers of the same type share their rotation.
    other_sliding = [i for i, t in enumerate(types) if t == SLIDING][1]
    assert torch.equal(cap.layers[sliding].cos, cap.layers[other_sliding].cos)


def test_capture_on_sequence_shorter_than_window(tiny_mistral: Any) -> None:
    """Fewer tokens than the window: sliding layers keep all of them, from position 0."""
    cap = capture_kv(tiny_mistral.model, _ids(n=5))
    for layer in cap.layers:
        assert layer.keys.shape[-2] == 5
        assert torch.equal(layer.positions, torch.arange(5))
        torch.testing.assert_close(apply_rope(layer.keys_pre_rope, layer.cos, layer.sin), layer.keys)


@pytest.mark.parametrize("seed", [1, 2], ids=["tokens-seed1", "tokens-seed2"])
def test_captured_pre_rope_keys_other_inputs(tiny_gemma3: Any, seed: int) -> None:
    cap, true_keys, _ = _capture_with_truth(tiny_gemma3, seed)
    for i, layer in enumerate(cap.layers):
        n = layer.keys.shape[-2]
        torch.testing.assert_close(layer.keys_pre_rope, true_keys[i][:, :, SEQ - n :, :], atol=ATOL, rtol=RTOL)


def test_rope_of_config_equals_the_model_s_own_tables(tiny) -> None:
    """Every architecture (Gemma 3's per-layer-type RoPE included): the tables read from a narrowed copy built from
    the config alone equal those of the model itself."""
    from kvtool.capture import prefix_rope, rope_of_config

    ours = rope_of_config(tiny.model.config, 40)
    theirs = prefix_rope(tiny.model, tiny.info.num_layers, 40)
    assert len(ours) == len(theirs)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))
