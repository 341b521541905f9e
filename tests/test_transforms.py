"""TensorTransform / KVTransform semantics, bit accounting, serialization, the attention wrapper and the harness.

Everything runs on synthetic tensors or on the random-weight tiny models of ``tests/tiny_models.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvtool.arch import apply_rope, invert_rope
from kvtool.attention import transformed_attention
from kvtool.capture import capture_kv
from kvtool.errors import ArtifactError
from kvtool.eval.harness import continuation_quality, perplexity, prefill, transform_cache
from kvtool.quantizers import UniformQuantizer
from kvtool.transforms import BitCost, KVTransform, TensorTransform

U = UniformQuantizer


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kv_like(seed: int = 0, tokens: int = 40, head_dim: int = 16) -> torch.Tensor:
    """Random normal ``(2, 3, tokens, head_dim)`` with a few outliers and one large-magnitude channel, like keys."""
    x = _randn(2, 3, tokens, head_dim, seed=seed)
    x[..., 4] *= 5.0
    x[0, 0, min(5, tokens - 1), 3] = 12.0
    x[1, 2, tokens - 3, 7] = -9.0
    return x


def _rel_mse(q: TensorTransform, x: torch.Tensor) -> float:
    return float(((q.apply(x) - x) ** 2).mean() / x.var())


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Passthrough(TensorTransform):
    """Test double: a 'transform' that returns its input (so the wrapper runs but changes nothing)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        return BitCost(16.0, 16.0)

    def label(self) -> str:
        return "passthrough"


# -- UniformQuantizer ------------------------------------------------------------------------------------------------

QUANT_LAYOUTS = [
    pytest.param("token", None, id="token-gD"),
    pytest.param("token", 4, id="token-g4"),
    pytest.param("token", 8, id="token-g8"),
    pytest.param("channel", None, id="channel-g32"),
    pytest.param("channel", 8, id="channel-g8"),
    pytest.param("channel", 7, id="channel-g7"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(("axis", "group_size"), QUANT_LAYOUTS)
@pytest.mark.parametrize("bits", range(1, 9), ids=[f"int{b}" for b in range(1, 9)])
def test_uniform_shape_and_dtype(bits: int, axis: str, group_size: int | None, dtype: torch.dtype) -> None:
    x = _kv_like(tokens=37).to(dtype)
    y = U(bits, axis, group_size).apply(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(("axis", "group_size"), QUANT_LAYOUTS)
def test_uniform_error_decreases_with_bits(axis: str, group_size: int | None) -> None:
    x = _kv_like()
    errs = {b: _rel_mse(U(b, axis, group_size), x) for b in (2, 3, 4, 8)}
    assert errs[2] > errs[3] > errs[4] > errs[8], errs


def test_uniform_error_decreases_with_bits_on_offset_group() -> None:
    """One channel-axis group of 32 tokens spread evenly over [100.04, 100.06] (fp16 spacing at 100 is 0.0625).

    Regression: rounding the zero point to the nearest fp16 (100.0625) put it above every value, all codes clamped
    to 0 and the error was flat in bits. The zero is now rounded down and the scale up, so bits help again.
    """
    x = torch.linspace(100.04, 100.06, 32)[None, None, :, None].expand(1, 1, 32, 16).contiguous()
    errs = {b: float(((U(b, "channel", 32).apply(x) - x) ** 2).mean()) for b in (2, 4, 8)}
    assert errs[2] > errs[4] > errs[8], errs


@pytest.mark.parametrize(("axis", "group_size"), QUANT_LAYOUTS)
def test_uniform_8bit_error_tiny(axis: str, group_size: int | None) -> None:
    # Uniform step = range / 255; MSE ~ step^2 / 12 ~ 1e-5..1e-4 of the variance even with the outliers.
    assert _rel_mse(U(8, axis, group_size), _kv_like()) < 2e-4


@pytest.mark.parametrize(("axis", "group_size"), QUANT_LAYOUTS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=["int1", "int2", "int4", "int8"])
def test_uniform_constant_tensor_reconstructs(bits: int, axis: str, group_size: int | None) -> None:
    """A constant group decodes at least as accurately as the constant rounded to fp16 (the zero point is rounded
    down to fp16 and the scale, rounded up, bridges the rest)."""
    x = torch.full((1, 2, 37, 16), 0.123456789)
    y = U(bits, axis, group_size).apply(x)
    assert (y - x).abs().max() <= (x.half().float() - x).abs().max()
    torch.testing.assert_close(y, x, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [2, 4], ids=["int2", "int4"])
@pytest.mark.parametrize(("tokens", "group_size"), [(37, 8), (33, 32), (5, 32)], ids=["t37-g8", "t33-g32", "t5-g32"])
def test_uniform_channel_partial_group(bits: int, tokens: int, group_size: int) -> None:
    """Token count not divisible by the group size: every group (the short last one too) is quantized alone."""
    x = _kv_like(tokens=tokens)
    q = U(bits, "channel", group_size)
    y = q.apply(x)
    starts = range(0, tokens, group_size)
    separately = torch.cat([q.apply(x[:, :, s : s + group_size, :]) for s in starts], dim=2)
    assert torch.equal(y, separately)
    last = (tokens // group_size) * group_size if tokens % group_size else tokens - group_size
    assert torch.equal(y[:, :, last:, :], q.apply(x[:, :, last:, :]))


def test_uniform_token_groups_are_independent() -> None:
    x = _kv_like()
    q = U(3, "token", 4)
    y = q.apply(x)
    for s in range(0, 16, 4):
        assert torch.equal(y[..., s : s + 4], U(3, "token", None).apply(x[..., s : s + 4]))


def test_uniform_token_partial_last_group() -> None:
    """head_dim 16 in groups of 5: groups [0,5), [5,10), [10,15) and a last group of one channel, each quantized
    on its own (as cost() counts them: 4 groups of metadata per token)."""
    x = _kv_like()
    y = U(4, "token", 5).apply(x)
    for s in range(0, 16, 5):
        assert torch.equal(y[..., s : s + 5], U(4, "token", None).apply(x[..., s : s + 5]))
    assert U(4, "token", 5).cost(16, 10).all_in == 4 + 32 * 4 / 16


@pytest.mark.parametrize("bits", [0, 9, -1], ids=["bits0", "bits9", "bits-1"])
def test_uniform_bits_out_of_range_raises(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        U(bits)


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 4, "axis": "head"}, {"bits": 4, "group_size": 0}],
    ids=["bad-axis", "group0"],
)
def test_uniform_bad_settings_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        U(**kwargs)


def test_uniform_codes_within_levels() -> None:
    """2-bit per-token: every token-head row decodes to at most 4 distinct values."""
    y = U(2, "token").apply(_kv_like())
    rows = y.reshape(-1, 16)
    assert max(len(torch.unique(r)) for r in rows) <= 4


# -- cost -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantizer", "head_dim", "tokens", "nominal", "all_in"),
    [
        # 32 bits (fp16 scale + fp16 zero) per token per head, spread over head_dim = 64 channels.
        pytest.param(U(4, "token"), 64, 64, 4.0, 4.0 + 32 / 64, id="token-gD-hd64-int4"),
        # Groups of 16 channels: 4 groups per token.
        pytest.param(U(4, "token", 16), 64, 64, 4.0, 4.0 + 4 * 32 / 64, id="token-g16-hd64-int4"),
        # 64 tokens in groups of 32: 2 groups per channel, 2 * 32 bits over 64 tokens.
        pytest.param(U(4, "channel", 32), 64, 64, 4.0, 5.0, id="channel-g32-t64-int4"),
        # 33 tokens: a full group and a group of 1, each with its scale and zero.
        pytest.param(U(4, "channel", 32), 64, 33, 4.0, 4 + 32 * 2 / 33, id="channel-g32-t33-int4"),
        pytest.param(U(2, "channel"), 16, 32, 2.0, 3.0, id="channel-default-t32-int2"),
    ],
)
def test_uniform_cost(quantizer: U, head_dim: int, tokens: int, nominal: float, all_in: float) -> None:
    c = quantizer.cost(head_dim, tokens)
    assert c.nominal == nominal
    assert c.all_in == pytest.approx(all_in, rel=1e-12)


@pytest.mark.parametrize(
    ("quantizer", "label"),
    [(U(4, "token"), "int4/token-gD"), (U(2, "channel"), "int2/channel-g32"), (U(3, "token", 8), "int3/token-g8")],
    ids=["token-gD", "channel-g32", "token-g8"],
)
def test_uniform_label(quantizer: U, label: str) -> None:
    assert quantizer.label() == label


# -- KVTransform.apply_layer ----------------------------------------------------------------------------------------


def test_identity_transform_leaves_kv_unchanged() -> None:
    t = KVTransform([None, None], [None, None], sink_tokens=4, recent_tokens=8)
    assert t.is_identity
    k, v = _kv_like(seed=1), _kv_like(seed=2)
    cos, sin = torch.ones(2, 40, 16), torch.zeros(2, 40, 16)
    k2, v2 = t.apply_layer(1, k, v, cos, sin)
    assert torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("first_position", [0, 2], ids=["from-pos0", "from-pos2"])
def test_sink_and_recent_tokens_are_fp16_copies(first_position: int) -> None:
    """Sinks (the first ``sink_tokens`` positions) and the ``recent_tokens`` last tokens are exactly x.half();
    the tokens in between are quantized (differ from both x and x.half())."""
    sink, recent, n = 4, 8, 40
    t = KVTransform.uniform(
        1, U(2, "token"), U(2, "channel", 8), keys_pre_rope=False, sink_tokens=sink, recent_tokens=recent
    )
    k, v = _kv_like(seed=1, tokens=n), _kv_like(seed=2, tokens=n)
    k2, v2 = t.apply_layer(0, k, v, None, None, first_position=first_position)
    kept_sinks = sink - first_position
    for x, y in ((k, k2), (v, v2)):
        assert y.shape == x.shape
        assert torch.equal(y[..., :kept_sinks, :], x[..., :kept_sinks, :].half().float())
        assert torch.equal(y[..., n - recent :, :], x[..., n - recent :, :].half().float())
        mid, xmid = y[..., kept_sinks : n - recent, :], x[..., kept_sinks : n - recent, :]
        assert not torch.equal(mid, xmid)
        assert (mid - xmid.half().float()).abs().max() > 0.1
    # The middle is exactly the quantizer applied to the middle slice.
    assert torch.equal(k2[..., kept_sinks : n - recent, :], U(2, "token").apply(k[..., kept_sinks : n - recent, :]))


def test_sinks_past_first_position_are_not_kept() -> None:
    """A window starting after the sinks (sliding layer) keeps only the recent tokens in fp16."""
    t = KVTransform.uniform(1, None, U(2, "token"), sink_tokens=4, recent_tokens=3)
    v = _kv_like(tokens=7)
    _, v2 = t.apply_layer(0, v, v, None, None, first_position=57)
    assert torch.equal(v2[..., :4, :], U(2, "token").apply(v[..., :4, :]))
    assert torch.equal(v2[..., 4:, :], v[..., 4:, :].half().float())


def test_recent_tokens_cover_everything() -> None:
    t = KVTransform.uniform(1, None, U(2, "token"), recent_tokens=100)
    v = _kv_like(tokens=7)
    _, v2 = t.apply_layer(0, v, v, None, None)
    assert torch.equal(v2, v.half().float())


def test_keys_pre_rope_vs_post_rope_on_captured_keys(tiny_llama: Any) -> None:
    """On real keys, quantizing before RoPE (rotate back, quantize, rotate) differs from quantizing the cached keys,
    and the pre-RoPE path is exactly apply_rope(q(invert_rope(k)))."""
    layer = capture_kv(tiny_llama.model, _ids(24)).layers[0]
    q = U(2, "channel", 8)
    pre = KVTransform.uniform(2, q, None, keys_pre_rope=True)
    post = KVTransform.uniform(2, q, None, keys_pre_rope=False)
    k_pre, v_pre = pre.apply_layer(0, layer.keys, layer.values, layer.cos, layer.sin)
    k_post, v_post = post.apply_layer(0, layer.keys, layer.values, layer.cos, layer.sin)
    assert (k_pre - k_post).abs().max() > 1e-2
    assert torch.equal(v_pre, layer.values) and torch.equal(v_post, layer.values)
    assert torch.equal(k_post, q.apply(layer.keys))
    expected = apply_rope(q.apply(invert_rope(layer.keys, layer.cos, layer.sin)), layer.cos, layer.sin)
    assert torch.equal(k_pre, expected)


def test_keys_pre_rope_needs_cos_sin() -> None:
    t = KVTransform.uniform(1, U(4), None, keys_pre_rope=True)
    with pytest.raises(ValueError, match="cos/sin"):
        t.apply_layer(0, _kv_like(), _kv_like(), None, None)


@pytest.mark.parametrize(
    "kwargs",
    [{"keys": [None], "values": [None, None]}, {"keys": [None], "values": [None], "sink_tokens": -1}],
    ids=["length-mismatch", "negative-sinks"],
)
def test_kvtransform_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        KVTransform(**kwargs)


# -- bit accounting -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param(U(4, "token"), U(4, "token"), id="int4-token"),
        pytest.param(U(2, "channel", 32), U(2, "channel", 32), id="int2-channel-g32"),
        pytest.param(U(3, "token", 8), U(3, "token", 8), id="int3-token-g8"),
    ],
)
def test_bits_uniform_equals_quantizer_cost(tiny_llama: Any, key: U, value: U) -> None:
    arch = tiny_llama.info
    t = KVTransform.uniform(arch.num_layers, key, value)
    b = t.bits(arch, 64)
    c = key.cost(arch.head_dim, 64)
    assert b["context_len"] == 64
    assert b["nominal"] == pytest.approx(c.nominal, rel=1e-12)
    assert b["all_in"] == pytest.approx(c.all_in, rel=1e-12)
    assert len(b["layers"]) == arch.num_layers
    for row in b["layers"]:
        assert row["k_nominal"] == row["v_nominal"] == pytest.approx(c.nominal)
        assert row["k_all_in"] == row["v_all_in"] == pytest.approx(c.all_in)


def test_bits_with_sinks_and_recent_hand_computed(tiny_llama: Any) -> None:
    """head_dim 16, context 64, 4 sinks + 8 recent in fp16, so 52 quantized tokens per head.

    keys: int4 channel-axis g32: 52 tokens -> ceil(52/32) = 2 groups -> 2*32 bits of scale+zero per channel.
        stored bits per channel = 52*4 + 2*32 + 12*16 = 208 + 64 + 192 = 464 over 64 tokens -> 7.25 bits/element.
    values: int2 token-axis gD: per token 16*2 code bits + 32 meta bits = 64 -> 4 bits/element on 52 tokens.
        stored bits per channel-equivalent = 52*4 + 12*16 = 208 + 192 = 400 over 64 tokens -> 6.25 bits/element.
    all_in = (7.25 + 6.25) / 2 = 6.75 (keys and values have as many elements).
    nominal = code bits over transformed elements = (52*4 + 52*2) / (52 + 52) = 3.0.
    """
    arch = tiny_llama.info
    assert arch.head_dim == 16
    t = KVTransform.uniform(arch.num_layers, U(4, "channel", 32), U(2, "token"), sink_tokens=4, recent_tokens=8)
    b = t.bits(arch, 64)
    assert b["all_in"] == pytest.approx(6.75, rel=1e-12)
    assert b["nominal"] == pytest.approx(3.0, rel=1e-12)
    for row in b["layers"]:
        assert row["k_all_in"] == pytest.approx(7.25, rel=1e-12)
        assert row["v_all_in"] == pytest.approx(6.25, rel=1e-12)
        assert row["k_nominal"] == pytest.approx(4.0)
        assert row["v_nominal"] == pytest.approx(2.0)


def test_bits_mixed_none_layers(tiny_llama: Any) -> None:
    """Layer 1 untouched (fp16): all_in averages 6.0 (layer 0, int4 token gD on hd 16 = 4 + 32/16) with 16."""
    arch = tiny_llama.info
    t = KVTransform([U(4), None], [U(4), None])
    b = t.bits(arch, 64)
    assert b["all_in"] == pytest.approx((6.0 + 16.0) / 2)
    assert b["nominal"] == pytest.approx((4 * 2 + 16 * 2) / 4)  # untouched tensors count as fp16 codes
    assert b["layers"][1] == {"k_nominal": 16.0, "k_all_in": 16.0, "v_nominal": 16.0, "v_all_in": 16.0}


def test_bits_sliding_layers_count_only_the_window(tiny_mistral: Any) -> None:
    """Mistral (window 8): each sliding layer caches 7 tokens at positions 57..63, so sinks are gone.

    keys int4 channel g32 over 7 tokens: 4 + 32*1/7; values int4 token gD: 4 + 32/16 = 6.
    """
    arch = tiny_mistral.info
    t = KVTransform.uniform(arch.num_layers, U(4, "channel", 32), U(4, "token"), sink_tokens=4)
    b = t.bits(arch, 64)
    assert b["all_in"] == pytest.approx((4 + 32 / 7 + 6.0) / 2, rel=1e-12)
    assert b["nominal"] == pytest.approx(4.0)


def test_bits_identity_is_fp16(tiny_gemma3: Any) -> None:
    b = KVTransform.uniform(tiny_gemma3.info.num_layers, None, None).bits(tiny_gemma3.info, 64)
    assert b["nominal"] == b["all_in"] == 16.0


# -- serialization --------------------------------------------------------------------------------------------------


def _mixed_transform() -> KVTransform:
    return KVTransform(
        keys=[U(4, "channel", 32), None, U(2, "token", 8), U(8)],
        values=[None, U(3, "channel"), U(2, "token"), None],
        keys_pre_rope=False,
        sink_tokens=2,
        recent_tokens=5,
        name="mixed",
    )


def test_to_dict_from_dict_round_trip() -> None:
    t = _mixed_transform()
    d = json.loads(json.dumps(t.to_dict()))
    back = KVTransform.from_dict(d)
    assert back == t
    assert back.name == "mixed"
    assert back.keys[1] is None and back.values[0] is None and back.values[3] is None
    assert back.to_dict() == t.to_dict()
    assert d["keys"][0] == {
        "_type": "UniformQuantizer",
        "_version": 1,
        "_data": {"bits": 4, "axis": "channel", "group_size": 32, "rotate": False},
    }


def _with_entry(d: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    d["keys"][0] = entry
    return d


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"_type": "EvilQuantizer", "_version": 1, "_data": {"bits": 4}}, id="unknown-type"),
        pytest.param({"_version": 1, "_data": {"bits": 4}}, id="missing-type"),
        pytest.param(
            {"_type": "UniformQuantizer", "_version": 1, "_data": {"bits": 4, "axis": "token", "extra": 1}},
            id="extra-field",
        ),
        pytest.param({"_type": "UniformQuantizer", "_version": 99, "_data": {"bits": 4}}, id="newer-version"),
        pytest.param({"_type": "UniformQuantizer", "_version": 1, "_data": {"bits": 9}}, id="invalid-bits"),
        pytest.param({"_type": "UniformQuantizer", "_version": 1, "_data": {}}, id="missing-bits"),
    ],
)
def test_from_dict_rejects_bad_method_entries(entry: dict[str, Any]) -> None:
    with pytest.raises(ArtifactError):
        KVTransform.from_dict(_with_entry(_mixed_transform().to_dict(), entry))


def test_from_dict_rejects_extra_top_level_field() -> None:
    d = _mixed_transform().to_dict()
    d["unexpected"] = 1
    with pytest.raises(ArtifactError):
        KVTransform.from_dict(d)


@pytest.mark.parametrize("damage", ["drop-sink_tokens", "short-values"])
def test_from_dict_malformed_is_artifact_error(damage: str) -> None:
    d = _mixed_transform().to_dict()
    if damage == "drop-sink_tokens":
        del d["sink_tokens"]
    else:
        d["values"] = d["values"][:1]
    with pytest.raises(ArtifactError):
        KVTransform.from_dict(d)


# -- transformed_attention ------------------------------------------------------------------------------------------

PPL_IDS = 40


def _ppl(model: Any, transform: KVTransform | None) -> float:
    return perplexity(model, _ids(PPL_IDS), window=64, transform=transform).ppl


def test_identity_transform_perplexity_exact(tiny: Any) -> None:
    plain = _ppl(tiny.model, None)
    identity = KVTransform.uniform(tiny.info.num_layers, None, None)
    assert _ppl(tiny.model, identity) == plain


@pytest.mark.parametrize("keys_pre_rope", [False, True], ids=["post-rope", "pre-rope"])
def test_passthrough_through_wrapper_matches_plain(tiny: Any, keys_pre_rope: bool) -> None:
    """A non-identity transform that changes nothing runs through the kvtool-sdpa wrapper (masks, sliding windows,
    GQA) and reproduces the plain logits: exactly post-RoPE, within fp32 RoPE round trip (~1e-6) pre-RoPE."""
    ids = _ids(PPL_IDS)[None]
    t = KVTransform.uniform(tiny.info.num_layers, Passthrough(), Passthrough(), keys_pre_rope=keys_pre_rope)
    with torch.no_grad():
        plain = tiny.model(input_ids=ids, use_cache=False).logits
        with transformed_attention(tiny.model, t):
            assert tiny.model.config._attn_implementation == "kvtool-sdpa"
            wrapped = tiny.model(input_ids=ids, use_cache=False).logits
    if keys_pre_rope:
        torch.testing.assert_close(wrapped, plain, atol=1e-4, rtol=1e-5)
    else:
        assert torch.equal(wrapped, plain)


def test_quantized_perplexity_ordering(tiny: Any) -> None:
    """8-bit K/V: perplexity within 1% of plain but not identical; 2-bit moves it more than 8-bit."""
    layers = tiny.info.num_layers
    plain = _ppl(tiny.model, None)
    p8 = _ppl(tiny.model, KVTransform.uniform(layers, U(8), U(8)))
    p2 = _ppl(tiny.model, KVTransform.uniform(layers, U(2), U(2)))
    assert p8 != plain
    assert abs(p8 - plain) / plain < 1e-2
    assert abs(p2 - plain) > abs(p8 - plain)


def test_attention_restored_after_context(tiny: Any) -> None:
    ids = _ids(PPL_IDS)[None]
    model = tiny.model
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with transformed_attention(model, KVTransform.uniform(tiny.info.num_layers, U(2), U(2))):
            inside = model(input_ids=ids).logits
        assert model.config._attn_implementation == "sdpa"
        after = model(input_ids=ids).logits
    assert not torch.equal(inside, plain)
    assert torch.equal(after, plain)


def test_attention_restored_after_exception(tiny_gemma3: Any) -> None:
    model = tiny_gemma3.model
    with pytest.raises(RuntimeError, match="boom"):
        with transformed_attention(model, KVTransform.uniform(tiny_gemma3.info.num_layers, U(2), U(2))):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_only_layer0_keys_changes_logits(tiny: Any) -> None:
    ids = _ids(PPL_IDS)[None]
    n = tiny.info.num_layers
    t = KVTransform([U(2, "channel")] + [None] * (n - 1), [None] * n)
    with torch.no_grad():
        plain = tiny.model(input_ids=ids, use_cache=False).logits
        with transformed_attention(tiny.model, t):
            changed = tiny.model(input_ids=ids, use_cache=False).logits
    assert (changed - plain).abs().max() > 1e-3
    # The first position attends only to itself; its logits change only through its own quantized key,
    # which a softmax over one key ignores: identical.
    torch.testing.assert_close(changed[:, 0], plain[:, 0], atol=1e-5, rtol=1e-5)


# -- harness: continuation quality and transform_cache --------------------------------------------------------------


def test_continuation_quality_tiny_llama(tiny_llama: Any) -> None:
    model, n = tiny_llama.model, tiny_llama.info.num_layers
    t8 = KVTransform.uniform(n, U(8), U(8))
    t2 = KVTransform.uniform(n, U(2), U(2))
    rows = continuation_quality(model, _ids(80), [None, t8, t2], prefix_len=32, cont_len=16, offsets=(0, 20))
    none, r8, r2 = rows
    assert none.kl < 1e-6
    assert none.top1 == 1.0
    assert all(r.num_predictions == 2 * 16 for r in rows)
    assert r2.kl > r8.kl > 0
    assert math.isfinite(r2.ppl) and r2.ppl > 1


def test_continuation_quality_needs_enough_tokens(tiny_llama: Any) -> None:
    from kvtool.errors import InputError

    with pytest.raises(InputError):
        continuation_quality(tiny_llama.model, _ids(60), [None], prefix_len=32, cont_len=16, offsets=(0, 20))


def test_transform_cache_matches_apply_layer_on_capture(tiny: Any) -> None:
    """The cache path (prefill + transform_cache) and the capture path (capture_kv + apply_layer) agree exactly,
    sliding layers (first_position > 0, sinks evicted) included; the prefix cache itself is left untouched."""
    prefix_ids = _ids(32)
    n = tiny.info.num_layers
    t = KVTransform.uniform(n, U(3, "channel", 8), U(2, "token"), keys_pre_rope=True, sink_tokens=2, recent_tokens=4)
    prefix = prefill(tiny.model, prefix_ids)
    original = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    cache = transform_cache(prefix, t)
    cap = capture_kv(tiny.model, prefix_ids)
    for i, layer in enumerate(cap.layers):
        k, v = t.apply_layer(i, layer.keys, layer.values, layer.cos, layer.sin, first_position=int(layer.positions[0]))
        assert torch.equal(cache.layers[i].keys, k), f"layer {i}"
        assert torch.equal(cache.layers[i].values, v), f"layer {i}"
        assert not torch.equal(cache.layers[i].values, layer.values), f"layer {i}"
        assert torch.equal(prefix.cache.layers[i].keys, original[i][0])
        assert torch.equal(prefix.cache.layers[i].values, original[i][1])


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96], ids=lambda d: f"D{d}")
def test_hadamard_rotation_is_orthonormal(head_dim: int) -> None:
    from kvtool.quantizers.uniform import _hadamard

    h = _hadamard(head_dim, torch.device("cpu"))
    torch.testing.assert_close(h @ h.T, torch.eye(head_dim), atol=1e-6, rtol=0)


def test_rotated_per_token_quantization_spreads_outlier_channels() -> None:
    """One channel 20x larger than the rest: per-token 3-bit error falls several-fold after the rotation (the
    outlier no longer sets the range of every token), and 8-bit rotated reconstruction stays within a 1e-4 relative
    MSE (step ~ range / 255 of the rotated token)."""
    x = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(0))
    x[..., 3] *= 20
    plain = (U(3, "token").apply(x) - x).square().mean()
    rotated = (U(3, "token", rotate=True).apply(x) - x).square().mean()
    assert rotated < plain / 3
    assert (U(8, "token", rotate=True).apply(x) - x).square().mean() < 1e-4 * x.square().mean()
    assert U(3, "token", rotate=True).cost(64, 32) == U(3, "token").cost(64, 32)  # the rotation is not stored


def test_rotation_only_on_token_axis() -> None:
    with pytest.raises(ValueError, match="token axis"):
        U(3, "channel", 32, rotate=True)
