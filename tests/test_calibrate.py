"""The precision search (``kvtool calibrate``): measured candidate table, solver optimality on the proxy, the
artifact, ``--resolve``, ``--validate`` / ``--max-ppl-delta`` and the failure exit codes.

Library tests run on the shared tiny Llama of ``conftest.py`` (head_dim 16) and search ``token`` and ``token-g8``
values; the default ``token-g32`` layout on that narrow head (one partial group) is tested at the end. The CLI
tests build the same tiny Llama with head_dim 32 as a real model folder with a BPE tokenizer, as ``test_cli.py``
does.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from tiny_models import save_model_folder

from kvtool.artifacts import read_artifact, write_artifact
from kvtool.calibrators.fisher import calibration_windows, fisher_stats
from kvtool.calibrators.precision_search import (
    ACCOUNTINGS,
    CandidateTable,
    PrecisionSearch,
    choice_summary,
    choice_transform,
    measure_candidates,
    search_extra,
    solve,
    table_from,
    table_tensors,
)

#: Small calibration settings of every CLI run (2 windows of 32 tokens).
SMALL = ("--num-seqs", "2", "--seq-len", "32")
BUDGETS = (3.0, 4.0, 6.0)
#: Value layouts with whole groups on head_dim 16.
VALUE_LAYOUTS_16 = ["token", "token-g8"]
BITS = [1, 2, 3, 4, 8]  # PrecisionSearch's default bit widths


# -- fixtures ----------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("isolated_home")  # every test of this module runs with a private home


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    """Tiny Llama, head_dim 32: every default candidate of the search applies."""
    return tiny_model_dir




@pytest.fixture(scope="module")
def art_a(model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``kvtool calibrate MODEL --target-bits 4 -o A.kvcal.safetensors --json`` (made once): path and JSON."""
    folder = tmp_path_factory.mktemp("art-a")
    path = folder / "A.kvcal.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVTOOL_HOME", str(folder / "kvhome"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        r = invoke("calibrate", model_dir, "--text", text_file, *SMALL, "--target-bits", 4, "-o", path, "--json")
    assert r.exit_code == 0, r.stderr
    return path, json.loads(r.stdout)


# -- the measured table (library) --------------------------------------------------------------------------------

#: Uniform candidates only: every all-in cost is then a multiple of 1/64 (exact brute force); the non-uniform
#: candidates are tested on their own below.
SEARCH_16 = PrecisionSearch(num_seqs=2, seq_len=64, value_layouts=VALUE_LAYOUTS_16, nuq_bits=[])


@pytest.fixture(scope="module")
def measured(tiny_llama) -> tuple[Any, CandidateTable]:
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    return tiny_llama, measure_candidates(tiny_llama.model, tiny_llama.info, ids, SEARCH_16)


def _index(layout_idx: int, bits: int) -> int:
    """Column of (layout, bits) in a candidate table: fp16 first, then layout-major, bits ascending."""
    return 1 + layout_idx * len(BITS) + BITS.index(bits)


def test_measure_candidates_table(measured) -> None:
    tiny, table = measured
    layers = tiny.info.num_layers
    layouts = {"k": SEARCH_16.key_layouts, "v": SEARCH_16.value_layouts}
    for kind in ("k", "v"):
        n = 1 + len(layouts[kind]) * len(BITS)
        assert [c.label() for c in table.candidates[kind]] == [c.label() for c in SEARCH_16.candidates(kind, tiny.info)]
        err = table.error[kind]
        assert err.shape == (layers, n) and err.dtype == np.float64
        assert np.isfinite(err).all() and (err >= 0).all()
        for acc in ACCOUNTINGS:
            assert table.bits[kind][acc].shape == (layers, n)
        # fp16 beats every 2-bit candidate in every slot.
        two_bit = [_index(li, 2) for li in range(len(layouts[kind]))]
        assert (err[:, [0]] < err[:, two_bit]).all()
        monotone = total = 0
        for li in range(len(layouts[kind])):
            cols = [_index(li, b) for b in BITS]
            assert (err[:, _index(li, 8)] < err[:, _index(li, 2)]).all(), (kind, layouts[kind][li])
            steps = np.diff(err[:, cols], axis=1)  # error change per added bit width, (layers, len(BITS) - 1)
            monotone += int((steps <= 0).sum())
            total += steps.size
        assert monotone >= 0.9 * total, (kind, monotone, total)
    assert table.weights.tolist() == [64.0 * tiny.info.num_kv_heads * tiny.info.head_dim] * layers


def test_proxy_is_fisher_weighted_error(measured) -> None:
    """Recomputed from the definition: Σ over windows of Σ g² (x̂ - x)², the slot's own gradient, sink excluded."""
    tiny, table = measured
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    windows = calibration_windows(ids, SEARCH_16.seq_len, SEARCH_16.num_seqs, SEARCH_16.seed)
    cols = {"k": _index(SEARCH_16.key_layouts.index("channel-g32"), 2), "v": _index(0, 3)}
    want = {k: np.zeros(tiny.info.num_layers) for k in cols}
    for stats in fisher_stats(tiny.model, windows):
        for i, st in enumerate(stats):
            for k, x, g in (("k", st.keys, st.key_grad), ("v", st.values, st.value_grad)):
                x, g = x[..., 1:, :], g[..., 1:, :]  # the one sink token is kept in fp16: no error
                q = table.candidates[k][cols[k]]
                want[k][i] += float((g.square() * (q.apply(x) - x).square()).sum())
    for k, j in cols.items():
        np.testing.assert_allclose(table.error[k][:, j], want[k], rtol=1e-5)


def test_candidate_bits(measured) -> None:
    """Accounting of the table at 64 tokens with one fp16 sink token, head_dim 16."""
    _, table = measured
    for kind in ("k", "v"):
        nominal, all_in = table.bits[kind]["nominal"], table.bits[kind]["all-in"]
        assert (nominal[:, 0] == 16).all() and (all_in[:, 0] == 16).all()
        assert (nominal[:, 1:] == np.tile(BITS, (nominal.shape[1] - 1) // len(BITS))).all()
        assert (all_in[:, 1:] > nominal[:, 1:]).all()
    tok4 = _index(SEARCH_16.value_layouts.index("token"), 4)
    # 63 coded tokens at 4 bits + fp16 scale and zero per 16 channels (2 bits), 1 fp16 sink token.
    assert table.bits["v"]["all-in"][:, tok4] == pytest.approx((63 * 6 + 16) / 64)
    g32 = _index(SEARCH_16.key_layouts.index("channel-g32"), 2)
    # Per channel: ceil(63 / 32) = 2 groups of fp16 scale and zero over 63 tokens.
    assert table.bits["k"]["all-in"][:, g32] == pytest.approx((63 * (2 + 64 / 63) + 16) / 64)


def _uniform_choices(table: CandidateTable) -> list[dict[str, list[int]]]:
    layers = len(table.weights)
    return [
        {"k": [jk] * layers, "v": [jv] * layers}
        for jk in range(len(table.candidates["k"]))
        for jv in range(len(table.candidates["v"]))
    ]


@pytest.mark.parametrize("accounting", ACCOUNTINGS)
@pytest.mark.parametrize("target", BUDGETS)
def test_choice_meets_budget_and_beats_uniform(measured, accounting: str, target: float) -> None:
    """The searched choice fits the budget in its accounting, and its proxy error is at most that of every uniform
    configuration (one candidate for all keys, one for all values) that fits too."""
    _, table = measured
    key = accounting.replace("-", "_")
    choice = solve(table, target, accounting)
    got = choice_summary(table, choice)
    assert got[key] <= target + 1e-9
    fitting = 0
    for uni in _uniform_choices(table):
        s = choice_summary(table, uni)
        if s[key] <= target:
            fitting += 1
            assert got["proxy"] <= s["proxy"] * (1 + 1e-12), (uni, s, got)
    assert fitting > 0  # the comparison is not vacuous


@pytest.mark.parametrize("accounting", ACCOUNTINGS)
@pytest.mark.parametrize("target", BUDGETS)
def test_choice_is_the_exact_optimum(measured, accounting: str, target: float) -> None:
    """All per-layer combinations (uniform candidates): the solver finds the least proxy error within
    the budget (the bits are multiples of 1/64 at 64 tokens, so the solver's grid is exact here)."""
    _, table = measured
    bits = {k: table.bits[k][accounting] for k in ("k", "v")}
    assert all(float(b * 64).is_integer() for k in bits for b in bits[k].ravel())
    slots = [(k, i) for k in ("k", "v") for i in range(len(table.weights))]
    assert np.ptp(table.weights) == 0  # equal slots: the budget is a plain mean
    cost = sum(np.ix_(*[bits[k][i] for k, i in slots])[s] for s in range(len(slots))) / len(slots)
    err = sum(np.ix_(*[table.error[k][i] for k, i in slots])[s] for s in range(len(slots)))
    best = float(err[cost <= target + 1e-9].min())
    got = choice_summary(table, solve(table, target, accounting))
    assert got["proxy"] == pytest.approx(best, rel=1e-12)


def test_larger_budget_never_worse(measured) -> None:
    _, table = measured
    for accounting in ACCOUNTINGS:
        proxies = [choice_summary(table, solve(table, t, accounting))["proxy"] for t in np.arange(3.0, 16.01, 0.25)]
        assert all(b <= a for a, b in itertools.pairwise(proxies)), (accounting, proxies)


def test_table_round_trip_and_transform(measured) -> None:
    """table_tensors / search_extra -> table_from restores table and choice; the transform's own bit accounting
    agrees with choice_summary."""
    tiny, table = measured
    choice = solve(table, 4.0, "all-in")
    extra = json.loads(json.dumps(search_extra(table, choice)))  # what the artifact stores
    back, back_choice = table_from(extra, table_tensors(table, choice))
    assert back_choice == choice
    assert back.candidates == table.candidates
    for k in ("k", "v"):
        np.testing.assert_array_equal(back.error[k], table.error[k])
        for acc in ACCOUNTINGS:
            np.testing.assert_array_equal(back.bits[k][acc], table.bits[k][acc])
    np.testing.assert_array_equal(back.weights, table.weights)
    assert solve(back, 4.0, "all-in") == choice
    assert extra["search"]["choice"]["k"] == [table.candidates["k"][j].label() for j in choice["k"]]

    search = dataclasses.replace(SEARCH_16, target_bits=4.0)
    t = choice_transform(search, table, choice)
    assert t.keys == [table.candidates["k"][j] for j in choice["k"]]
    assert t.values == [table.candidates["v"][j] for j in choice["v"]]
    assert t.keys_pre_rope and t.sink_tokens == 1 and t.recent_tokens == 0
    summary = choice_summary(table, choice)
    bits = t.bits(tiny.info, SEARCH_16.seq_len)
    assert bits["all_in"] == pytest.approx(summary["all_in"])
    assert bits["nominal"] == pytest.approx(summary["nominal"])


# -- the CLI -----------------------------------------------------------------------------------------------------


def test_calibrate_json_and_determinism(art_a, model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    path_a, doc = art_a
    assert doc["path"] == str(path_a) and doc["all_in_bits"] <= 4.0
    assert doc["accounting"] == "all-in" and doc["validation"] is None
    assert len(doc["choice"]["k"]) == len(doc["choice"]["v"]) == 2
    art = read_artifact(path_a)
    assert art.extra["bits"]["all_in"] == pytest.approx(doc["all_in_bits"])
    assert art.extra["search"]["choice"] == doc["choice"]
    assert art.tensors["k_proxy_error"].shape == (2, 29) and art.tensors["v_proxy_error"].shape == (2, 24)
    assert art.inputs["num_seqs"] == 2 and art.inputs["seq_len"] == 32
    # A second run to another path writes the same bytes.
    path_b = tmp_path / "A2.kvcal.safetensors"
    r = invoke("calibrate", model_dir, "--text", text_file, *SMALL, "--target-bits", 4, "-o", path_b, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["content_digest"] == doc["content_digest"]
    assert path_b.read_bytes() == path_a.read_bytes()


def test_inspect_calibration(art_a) -> None:
    path_a, doc = art_a
    r = invoke("inspect", path_a, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["schema"] == "kvtool.kv_calibration"
    assert [row["layer"] for row in info["layers"]] == [0, 1]
    assert [row["keys"] for row in info["layers"]] == doc["choice"]["k"]
    assert [row["values"] for row in info["layers"]] == doc["choice"]["v"]
    assert all(float(row["K all-in bits"]) > 0 and float(row["V all-in bits"]) > 0 for row in info["layers"])
    human = invoke("inspect", path_a)
    assert human.exit_code == 0 and "per layer" in human.stdout and "kvtool.kv_calibration" in human.stdout


def test_resolve_needs_no_model(art_a, tmp_path: Path) -> None:
    """``--resolve`` re-solves the stored table: a model argument that names nothing is never loaded."""
    path_a, doc_a = art_a
    path_b = tmp_path / "B.kvcal.safetensors"
    r = invoke("calibrate", "no-such-model", "--resolve", path_a, "--target-bits", 6, "-o", path_b, "--json")
    assert r.exit_code == 0, r.stderr
    doc_b = json.loads(r.stdout)
    assert doc_b["path"] == str(path_b)
    assert doc_a["all_in_bits"] <= doc_b["all_in_bits"] <= 6.0
    assert doc_b["proxy_error"] <= doc_a["proxy_error"]
    a, b = read_artifact(path_a), read_artifact(path_b)
    assert b.model == a.model and b.inputs == a.inputs
    assert b.method["_data"]["target_bits"] == 6.0
    for name in ("k_proxy_error", "v_proxy_error", "k_bits_all_in", "v_bits_nominal", "slot_elements"):
        assert torch.equal(a.tensors[name], b.tensors[name]), name


def test_resolve_at_the_same_budget_reproduces_the_artifact(art_a, tmp_path: Path) -> None:
    path_a, _ = art_a
    out = tmp_path / "A-again.kvcal.safetensors"
    r = invoke("calibrate", "no-such-model", "--resolve", path_a, "--target-bits", 4, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert out.read_bytes() == path_a.read_bytes()


def test_resolve_below_cheapest_is_usage_error(art_a, tmp_path: Path) -> None:
    path_a, _ = art_a
    out = tmp_path / "C.kvcal.safetensors"
    r = invoke("calibrate", "no-such-model", "--resolve", path_a, "--target-bits", 1, "-o", out)
    assert_one_line_error(r, 2, "below the cheapest configuration")
    assert not out.exists()


def _validation_ok(v: dict[str, Any], tokens: int) -> None:
    assert set(v) >= {"ppl", "ppl_original", "delta_ppl_pct"}
    assert v["tokens"] == tokens
    assert math.isfinite(v["ppl"]) and math.isfinite(v["ppl_original"]) and v["ppl_original"] > 0
    assert v["delta_ppl_pct"] == pytest.approx(100 * (v["ppl"] / v["ppl_original"] - 1))


def test_validate_records_validation(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "V.kvcal.safetensors"
    r = invoke(
        "calibrate", model_dir, "--text", text_file, *SMALL, "--target-bits", 4, "--validate",
        "--validate-tokens", 64, "-o", out, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    v = read_artifact(out).extra["validation"]
    _validation_ok(v, 64)
    assert json.loads(r.stdout)["validation"] == v


def test_quality_gate_failure_exit_4_still_writes(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """``--max-ppl-delta -100`` (no perplexity can fall by 100%, so the gate must fail; the tiny random model's
    ΔPPL can be of either sign): exit 4. Documented behaviour: the artifact IS written
    (with its validation) and the result is printed on stdout before the one-line error on stderr, so a script sees
    what failed and can inspect it."""
    out = tmp_path / "G.kvcal.safetensors"
    r = invoke(
        "calibrate", model_dir, "--text", text_file, *SMALL, "--target-bits", 1, "--bits-accounting", "nominal",
        "--max-ppl-delta", -100, "--validate-tokens", 64, "-o", out, "--json",
    )  # fmt: skip
    assert_one_line_error(r, 4, "quality gate failed", str(out), stdout_empty=False)
    doc = json.loads(r.stdout)
    assert doc["path"] == str(out) and doc["nominal_bits"] <= 2.0
    art = read_artifact(out)
    _validation_ok(art.extra["validation"], 64)
    assert art.extra["validation"]["delta_ppl_pct"] > -100


def test_quality_gate_pass(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "P.kvcal.safetensors"
    r = invoke(
        "calibrate", model_dir, "--text", text_file, *SMALL, "--target-bits", 2, "--bits-accounting", "nominal",
        "--max-ppl-delta", 1000000, "--validate-tokens", 64, "-o", out, "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    _validation_ok(read_artifact(out).extra["validation"], 64)  # the gate implies --validate


def test_existing_output_needs_overwrite(art_a, model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    path_a, _ = art_a
    out = tmp_path / "existing.kvcal.safetensors"
    out.write_bytes(b"keep me")
    r = invoke("calibrate", model_dir, "--text", text_file, *SMALL, "--target-bits", 4, "-o", out)
    assert_one_line_error(r, 2, "--overwrite")
    r = invoke("calibrate", "no-such-model", "--resolve", path_a, "--target-bits", 6, "-o", out)
    assert_one_line_error(r, 2, "--overwrite")
    assert out.read_bytes() == b"keep me"
    r = invoke("calibrate", "no-such-model", "--resolve", path_a, "--target-bits", 6, "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0, r.stderr
    assert read_artifact(out).method["_data"]["target_bits"] == 6.0


def _flip_data_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-100] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_data_byte, _truncate], ids=["flipped-byte", "truncated"])
def test_resolve_corrupted_artifact_exit_3(art_a, tmp_path: Path, damage) -> None:
    bad = tmp_path / "bad.kvcal.safetensors"
    bad.write_bytes(art_a[0].read_bytes())
    damage(bad)
    out = tmp_path / "out.kvcal.safetensors"
    assert_one_line_error(invoke("calibrate", "no-such-model", "--resolve", bad, "--target-bits", 6, "-o", out), 3)
    assert not out.exists()


def test_resolve_other_schema_exit_3(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    cap = tmp_path / "kv.safetensors"
    assert invoke("capture", model_dir, "--text", text_file, "--tokens", 16, "-o", cap, "-q").exit_code == 0
    out = tmp_path / "out.kvcal.safetensors"
    r = invoke("calibrate", "no-such-model", "--resolve", cap, "--target-bits", 6, "-o", out)
    assert_one_line_error(r, 3, "kvtool.kv_capture", "expected kvtool.kv_calibration")
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", [9]),  # UniformQuantizer's ValueError: already exit 3
        ("seq_len", 8),  # PrecisionSearch's own validation (a UsageError) is an artifact error when read back
        ("key_layouts", ["diag"]),
    ],
)
def test_resolve_malformed_method_exit_3(art_a, tmp_path: Path, field: str, value: Any) -> None:
    """An intact file (valid digest) whose recorded method settings are invalid is a bad artifact: exit 3."""
    art = read_artifact(art_a[0])
    method = copy.deepcopy(art.method)
    method["_data"][field] = value
    bad = tmp_path / "bad.kvcal.safetensors"
    write_artifact(bad, dataclasses.replace(art, method=method, content_digest=""))
    out = tmp_path / "out.kvcal.safetensors"
    assert_one_line_error(invoke("calibrate", "no-such-model", "--resolve", bad, "--target-bits", 6, "-o", out), 3)


# -- the default value layout token-g32 on heads narrower than 32 channels (a partial group) ------------------


def test_default_search_on_head_dim_16(tiny_llama) -> None:
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    table = measure_candidates(tiny_llama.model, tiny_llama.info, ids, PrecisionSearch(num_seqs=1, seq_len=32))
    assert np.isfinite(table.error["v"]).all()


def test_cli_calibrate_head_dim_16(tmp_path_factory: pytest.TempPathFactory, text_file: Path, tmp_path: Path) -> None:
    folder = save_model_folder(tmp_path_factory.mktemp("tiny-llama-hd16"), text_file, 16)
    out = tmp_path / "hd16.kvcal.safetensors"
    r = invoke("calibrate", folder, "--text", text_file, *SMALL, "--target-bits", 4, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr


# -- --method nuq ----------------------------------------------------------------------------------------------


def test_cli_nuq_writes_one_artifact_per_bit_width(
    model_dir: Path, text_file: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r = invoke("calibrate", model_dir, "--method", "nuq", "--bits", "2,4", "--text", text_file, *SMALL, "--json")
    assert r.exit_code == 0, r.stderr
    docs = json.loads(r.stdout)["artifacts"]
    assert [Path(d["path"]).name for d in docs] == [f"{model_dir.name}.nuq2.kvcal.safetensors",
                                                    f"{model_dir.name}.nuq4.kvcal.safetensors"]  # fmt: skip
    assert docs[0]["all_in_bits"] < docs[1]["all_in_bits"]
    for d, b in zip(docs, (2, 4), strict=True):
        art = read_artifact(tmp_path / d["path"])
        assert art.method["_type"] == "NUQCalibration" and art.tensors["k_lut"].shape == (2, 1 << b)
        info = json.loads(invoke("inspect", tmp_path / d["path"], "--json").stdout)
        assert info["layers"][0]["keys"].startswith(f"fitted{b}/channel")


def test_cli_nuq_usage_errors(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    base = ("calibrate", model_dir, "--method", "nuq", "--text", text_file, *SMALL)
    assert_one_line_error(invoke(*base, "--bits", "2,3", "-o", tmp_path / "x.kvcal.safetensors"), 2, "-o names one")
    assert_one_line_error(invoke(*base, "--bits", "two"), 2, "--bits")
    assert_one_line_error(invoke(*base, "--bits", "3", "--outlier-frac", "0.7"), 2, "--outlier-frac")
    assert_one_line_error(invoke("calibrate", model_dir, "--method", "lloyd"), 2, "--method")


def test_search_with_non_uniform_candidates(tiny_llama, tmp_path: Path) -> None:
    """Non-uniform candidates carry per-layer fitted tables: the solver can pick them, the chosen transform is bound
    to that layer's tables, and the artifact keeps every table so a re-solve (no model) rebuilds them exactly."""
    from kvtool.calibration import calibration_artifact, transform_of
    from kvtool.calibrators.precision_search import resolve_artifact, search_extra, table_from, table_tensors
    from kvtool.quantizers import NonUniformQuantizer

    search = PrecisionSearch(num_seqs=2, seq_len=64, value_layouts=VALUE_LAYOUTS_16, nuq_bits=[2, 3])
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    table = measure_candidates(tiny_llama.model, tiny_llama.info, ids, search)
    nuq_cols = [j for j, c in enumerate(table.candidates["k"]) if isinstance(c, NonUniformQuantizer)]
    assert len(nuq_cols) == 2 and np.isfinite(table.error["k"][:, nuq_cols]).all()
    # Force a non-uniform choice in every slot: the cheapest non-uniform candidate.
    choice = {k: [next(j for j, c in enumerate(table.candidates[k]) if isinstance(c, NonUniformQuantizer))] * 2
              for k in ("k", "v")}  # fmt: skip
    t = choice_transform(search, table, choice)
    assert all(isinstance(q, NonUniformQuantizer) and q.lut is not None for q in t.keys + t.values)
    assert t.keys[0].thr_lo is not None and not torch.equal(t.keys[0].lut, t.keys[1].lut)
    model = {"id": "tiny", "config_digest": "sha256:" + "0" * 64, "weights_digest": "sha256:" + "1" * 64}
    model["arch"] = tiny_llama.info.to_dict()
    art = calibration_artifact(model, search, {}, t, search_extra(table, choice), table_tensors(table, choice), 64)
    path = tmp_path / "s.kvcal.safetensors"
    write_artifact(path, art)
    back = read_artifact(path)
    table2, choice2 = table_from(back.extra, back.tensors)
    assert choice2 == choice
    x = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(3))
    rebuilt = choice_transform(search, table2, choice2)
    for a, b in zip(t.keys + t.values, rebuilt.keys + rebuilt.values, strict=True):
        assert torch.equal(a.apply(x), b.apply(x))
    for a, b in zip(t.keys + t.values, transform_of(back).keys + transform_of(back).values, strict=True):
        assert torch.equal(a.apply(x), b.apply(x))
    _, resolved = resolve_artifact(back, 16.0, "all-in")  # re-solve without the model: tables still bound
    assert all(q is None or not isinstance(q, NonUniformQuantizer) or q.lut is not None for q in resolved.keys)
