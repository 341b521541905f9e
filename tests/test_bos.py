"""The model's BOS convention, on a tiny Llama whose tokenizer adds a BOS (a ``"<s> $A"`` post-processor, as Llama 3's).

A prompt is tokenized as a serving engine tokenizes it (exactly one BOS, first); every perplexity window and every
calibration sequence starts with the BOS followed by text tokens; a continuation never gets one; every artifact
and the bench output record the choice (``special_prefix``). A tokenizer that adds no BOS gives the ids it always
gave. What the model is fed is observed on the real model, through a hook on its embedding layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import invoke
from tiny_models import save_model_folder

from kvtool.artifacts import read_artifact
from kvtool.calibrators.fisher import calibration_windows
from kvtool.calibrators.nuq import NUQCalibration, fit_nuq
from kvtool.eval.harness import continuation_quality, perplexity
from kvtool.models import LoadedModel, load_model, special_prefix, tokenize

TEXT = "Anne Elliot was the second daughter of Sir Walter."




@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """The tiny Llama (head_dim 32) with a tokenizer that adds a BOS."""
    return save_model_folder(tmp_path_factory.mktemp("tiny-llama-bos"), text_file, 32, bos=True)


@pytest.fixture(scope="module")
def bos_lm(bos_dir: Path) -> LoadedModel:
    return load_model(str(bos_dir), device="cpu")


@pytest.fixture(scope="module")
def bos(bos_lm: LoadedModel) -> int:
    return int(bos_lm.tokenizer.bos_token_id)


@pytest.fixture(scope="module")
def plain_lm(tiny_model_dir: Path) -> LoadedModel:
    """The tiny Llama whose tokenizer adds no special token (the one every other CLI test uses)."""
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def stream(bos_lm: LoadedModel, text_file: Path) -> torch.Tensor:
    """Text tokens of the test text (no special tokens)."""
    return tokenize(bos_lm.tokenizer, text_file.read_text())


@contextmanager
def fed_ids(model: Any) -> Iterator[list[list[int]]]:
    """The token ids of every forward pass through ``model``'s embedding layer, one list per call."""
    seen: list[list[int]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0][0].tolist()))
    try:
        yield seen
    finally:
        hook.remove()


# --- tokenization ---------------------------------------------------------------------------------------------------


def test_special_prefix_is_what_the_tokenizer_adds(bos_lm: LoadedModel, plain_lm: LoadedModel, bos: int) -> None:
    assert special_prefix(bos_lm.tokenizer) == [bos]
    assert special_prefix(plain_lm.tokenizer) == []


def test_an_explicit_add_bos_token_is_honoured() -> None:
    class FlagOnly:
        """Says ``add_bos_token`` but its encoding adds nothing (a flag not wired to the encoder)."""

        bos_token_id, add_bos_token = 7, True

        def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None):
            ids = [10 + ord(c) % 50 for c in text]
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    assert special_prefix(FlagOnly()) == [7]
    assert tokenize(FlagOnly(), "ab", prompt=True).tolist() == [7, 10 + ord("a") % 50, 10 + ord("b") % 50]


def test_a_prompt_gets_exactly_one_bos_first(bos_lm: LoadedModel, bos: int) -> None:
    tok = bos_lm.tokenizer
    ids = tokenize(tok, TEXT, prompt=True)
    assert ids[0] == bos and int((ids == bos).sum()) == 1
    assert ids.tolist() == tok(TEXT)["input_ids"]  # what an engine feeds (add_special_tokens=True)
    assert torch.equal(ids[1:], tokenize(tok, TEXT))
    # A prompt that already carries the BOS (a chat template writes it) does not get a second one.
    assert torch.equal(tokenize(tok, tok.bos_token + TEXT, prompt=True), ids)


def test_a_text_stream_or_continuation_gets_no_bos(bos_lm: LoadedModel, bos: int) -> None:
    tok = bos_lm.tokenizer
    ids = tokenize(tok, TEXT)
    assert bos not in ids.tolist()
    assert ids.tolist() == tok(TEXT, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_without_bos_gives_the_same_ids(plain_lm: LoadedModel) -> None:
    tok = plain_lm.tokenizer
    before = tok(TEXT, add_special_tokens=False)["input_ids"]  # what tokenize() returned before the BOS convention
    assert tokenize(tok, TEXT).tolist() == before
    assert tokenize(tok, TEXT, prompt=True).tolist() == before


# --- what the model is fed ------------------------------------------------------------------------------------------


def test_every_perplexity_window_starts_with_bos(bos_lm: LoadedModel, stream: torch.Tensor, bos: int) -> None:
    ids = stream[:100]
    with fed_ids(bos_lm.model) as seen:
        r = perplexity(bos_lm.model, ids, 16, special_prefix=[bos])
    assert all(w[0] == bos and bos not in w[1:] for w in seen)
    assert [len(w) for w in seen] == [16] * 6 + [100 - 6 * 15 + 1]  # the window length stays what was asked
    assert sum((w[1:] for w in seen), []) == ids.tolist()
    assert (r.num_windows, r.num_predictions) == (7, 100)  # every text token is predicted, the first ones too
    # Without a prefix: the plain windows of the stream, as before.
    with fed_ids(bos_lm.model) as seen:
        r = perplexity(bos_lm.model, ids, 16)
    assert seen == [ids[i : i + 16].tolist() for i in range(0, 100, 16)]
    assert (r.num_windows, r.num_predictions) == (7, 93)


def test_every_calibration_sequence_starts_with_bos(bos_lm: LoadedModel, stream: torch.Tensor, bos: int) -> None:
    windows = calibration_windows(stream, 32, 3, 0, special_prefix=[bos])
    text = stream.tolist()
    for w in windows:
        assert w.numel() == 32 and w[0] == bos and bos not in w[1:].tolist()
        starts = [i for i in range(0, len(text) - 30, 31) if text[i : i + 31] == w[1:].tolist()]
        assert starts, "the rest of a sequence is a slot of the text"
    # The Fisher passes of a real calibrator feed exactly those sequences (once: on the CPU its second pass reads
    # the first one's spill).
    cfg = NUQCalibration(bits=[2], num_seqs=2, seq_len=32)
    with fed_ids(bos_lm.model) as seen:
        fit_nuq(bos_lm.model, bos_lm.arch, stream, cfg, special_prefix=[bos])
    assert seen == [w.tolist() for w in calibration_windows(stream, 32, 2, 0, special_prefix=[bos])]
    # Without a prefix: the plain slots, as before.
    assert [w.tolist() for w in calibration_windows(stream, 32, 2, 0)] == [
        stream[int(p) * 32 : int(p) * 32 + 32].tolist()
        for p in torch.randperm(stream.numel() // 32, generator=torch.Generator().manual_seed(0))[:2].sort().values
    ]


def test_continuation_prefix_has_bos_and_continuation_not(bos_lm: LoadedModel, stream: torch.Tensor, bos: int) -> None:
    with fed_ids(bos_lm.model) as seen:
        continuation_quality(bos_lm.model, stream, [None], prefix_len=16, cont_len=8, offsets=(0, 10),
                             special_prefix=[bos])  # fmt: skip
    text = stream.tolist()
    prefixes = [w for w in seen if len(w) == 16]
    conts = [w for w in seen if len(w) == 8]
    assert prefixes == [[bos, *text[0:15]], [bos, *text[10:25]]]  # 16 cached tokens, BOS first
    assert conts == [text[15:23]] * 2 + [text[25:33]] * 2  # reference and candidate pass: no BOS


# --- the CLI and the artifacts --------------------------------------------------------------------------------------


def test_capture_records_the_prefix(
    isolated_home: None, bos_dir: Path, tiny_model_dir: Path, text_file: Path, tmp_path: Path, bos: int
) -> None:
    out = tmp_path / "kv.safetensors"
    r = invoke("capture", bos_dir, "--text", text_file, "--tokens", 24, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    art = read_artifact(out)
    ids = art.tensors["input_ids"]
    assert ids.numel() == 24 and ids[0] == bos and int((ids == bos).sum()) == 1
    assert art.inputs["special_prefix"] == [bos]
    # No BOS: the ids are the text's own tokens, as before, and the artifact says so.
    r = invoke("capture", tiny_model_dir, "--text", text_file, "--tokens", 24, "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0, r.stderr
    art = read_artifact(out)
    plain = load_model(str(tiny_model_dir), device="cpu").tokenizer
    assert art.tensors["input_ids"].tolist() == plain(text_file.read_text(), add_special_tokens=False)["input_ids"][:24]
    assert art.inputs["special_prefix"] == []


def test_encode_stores_the_prompt_with_its_bos_and_generate_continues_without(
    isolated_home: None, bos_dir: Path, text_file: Path, tmp_path: Path, bos: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvtool.cli import decode as decode_cli
    from kvtool.codecs.kvz import KvzFile

    out = tmp_path / "ctx.kvz"
    r = invoke("encode", text_file, "-m", bos_dir, "--max-tokens", 40, "--chunk-tokens", 32, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    ids = KvzFile(out).input_ids()
    assert ids.numel() == 40 and ids[0] == bos and int((ids == bos).sum()) == 1
    # decode --generate feeds the continuation text on top of the cache: no BOS in it.
    fed: list[list[int]] = []

    def observed_load(*args: Any, **kwargs: Any) -> LoadedModel:
        lm = load_model(*args, **kwargs)
        lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0][0].tolist()))
        return lm

    monkeypatch.setattr(decode_cli, "load_model", observed_load)
    g = invoke("decode", out, "-m", bos_dir, "--generate", " Anne", "--max-new-tokens", 2, "--json")
    assert g.exit_code == 0, g.stderr
    cont = tokenize(load_model(str(bos_dir), device="cpu").tokenizer, " Anne").tolist()
    assert cont in fed and all(bos not in f for f in fed)  # (the codec's own passes feed no BOS either)


def test_calibration_and_validation_record_the_prefix(
    isolated_home: None, bos_dir: Path, text_file: Path, tmp_path: Path, bos: int
) -> None:
    out = tmp_path / "nuq.kvcal.safetensors"
    r = invoke("calibrate", bos_dir, "--method", "nuq", "--bits", 2, "--text", text_file, "--num-seqs", 2,
               "--seq-len", 32, "--validate", "--validate-tokens", 64, "-o", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    art = read_artifact(out)
    assert art.inputs["special_prefix"] == [bos]
    assert art.extra["validation"]["special_prefix"] == [bos] and art.extra["validation"]["tokens"] == 64


def test_bench_records_the_prefix(
    isolated_home: None, bos_dir: Path, tiny_model_dir: Path, text_file: Path, bos: int
) -> None:
    args = ("--text", text_file, "--tokens", 32, "--window", 16, "--no-continuation", "--configs", "kivi-k4v4")
    for folder, prefix in ((bos_dir, [bos]), (tiny_model_dir, [])):
        r = invoke("bench", folder, *args, "--json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["special_prefix"] == prefix and doc["ppl_tokens"] == 32
