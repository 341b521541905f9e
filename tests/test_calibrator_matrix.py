"""One shared matrix over every registered calibrator (beside the method matrix): a new calibrator is tested by
adding its name and small settings here.

Checked for each, on the tiny Llama saved as a real model folder (tokenizer included): it satisfies the
:class:`~kvtool.calibrators.base.Calibrator` protocol; the one-call entry ``calibrate`` gives the artifacts its
``outputs`` announce; each artifact, written and read back, holds a transform that equals ``solve`` on the same
table for the method's own budget, runs in attention and costs what the budget allows; the fit is deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtool.artifacts import read_artifact, write_artifact
from kvtool.budget import Budget
from kvtool.calibration import transform_of
from kvtool.calibrators.base import Calibrator, calibrate, calibrator, registry
from kvtool.errors import UsageError
from kvtool.eval.harness import perplexity
from kvtool.models import load_model, model_record, special_prefix, tokenize
from kvtool.texts import load_text

SMALL = {"num_seqs": 2, "seq_len": 48, "seed": 0}
#: (name, settings, a budget to solve for besides the method's own)
CALIBRATORS: list[tuple[str, dict[str, Any], Budget | None]] = [
    ("search", {"target_bits": 4.5}, Budget(bits=3.5, accounting="nominal")),
    ("nuq", {"bits": [3, 4]}, Budget(bits=3)),
    ("pca", {"target_bits": 3.0}, Budget(rank_fraction=0.5, kinds="k")),
    ("svd", {"target_bits": 3.0, "granularity": "head"}, Budget(bits=2.0)),
    ("engine", {"kv_dtype": "mixed", "target_bits": 6.0, "granularity": "head", "observer": "mse"}, Budget(bits=8.0)),
]


def test_every_registered_calibrator_is_in_the_matrix() -> None:
    assert sorted(registry()) == sorted(name for name, _, _ in CALIBRATORS)
    with pytest.raises(UsageError, match="--method must be one of"):
        calibrator("nope")


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize(("name", "settings", "budget"), CALIBRATORS, ids=[c[0] for c in CALIBRATORS])
def test_calibrator(name: str, settings: dict[str, Any], budget: Budget | None, lm: Any, text_file: Path,
                    tmp_path: Path) -> None:  # fmt: skip
    cal = calibrator(name, **SMALL, **settings)
    assert isinstance(cal, Calibrator)
    calls: list[int] = []
    arts = calibrate(lm, cal, text=str(text_file), progress=calls.append)
    assert sorted(arts) == sorted(cal.outputs())
    assert sum(calls) == SMALL["num_seqs"] * cal.passes  # what the CLI's progress bar counts to
    ids = tokenize(lm.tokenizer, load_text(str(text_file)))
    table = cal.fit(lm, ids, special_prefix=special_prefix(lm.tokenizer))
    again = cal.artifacts(model_record(lm), {}, table)
    x = torch.randn(1, lm.arch.num_kv_heads, 40, lm.arch.head_dim, generator=torch.Generator().manual_seed(1))
    for key, art in arts.items():
        path = tmp_path / f"{name}{key}.kvcal.safetensors"
        write_artifact(path, art)
        t = transform_of(read_artifact(path))
        own = cal.solve(table, None if len(arts) == 1 else Budget(bits=key))
        # deterministic: a second fit gives the same transform, and the written one is the solved one
        for a, b, c in zip(t.keys + t.values, own.keys + own.values, transform_of(again[key]).keys
                           + transform_of(again[key]).values, strict=True):  # fmt: skip
            if a is None:
                assert b is None and c is None
                continue
            assert torch.equal(a.apply(x), b.apply(x)) and torch.equal(a.apply(x), c.apply(x))
        if "target_bits" in settings:  # what the budget allows, in the transform's own accounting
            assert t.bits(lm.arch, SMALL["seq_len"])["all_in"] <= settings["target_bits"] + 1e-6
    # another budget: solved on the same table, and the transform runs in attention
    other = cal.solve(table, budget)
    r = perplexity(lm.model, ids[:96], 48, other)
    assert torch.isfinite(torch.tensor(r.ppl))


def test_fisher_passes_replay_equals_recompute(lm: Any, text_file: Path) -> None:
    """A second pass read back from the CPU spill holds exactly what recomputing it gives (what an accelerator
    does), and the spill folder is gone afterwards."""
    from kvtool.calibrators.fisher import FisherPasses, calibration_windows

    ids = tokenize(lm.tokenizer, load_text(str(text_file)))
    windows = calibration_windows(ids, 48, 2, 0, special_prefix(lm.tokenizer))
    with FisherPasses(lm.model, windows, spill=True) as spilled, FisherPasses(lm.model, windows, spill=False) as fresh:
        first = list(spilled)
        folder = spilled._folder
        assert folder is not None and len(list(folder.iterdir())) == len(windows)
        for a, b, c in zip(spilled, fresh, first, strict=True):  # second pass: replay vs recompute vs first pass
            for x, y, z in zip(a, b, c, strict=True):
                for name in ("keys", "key_grad", "values", "value_grad"):
                    assert torch.equal(getattr(x, name), getattr(y, name))
                    assert torch.equal(getattr(x, name), getattr(z, name))
    assert not folder.exists()


def test_fisher_passes_without_a_writable_tmpdir_recompute(lm: Any, text_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """No writable ``TMPDIR``: the spill is skipped, not a traceback; the second pass recomputes the same values."""
    import tempfile

    from kvtool.calibrators.fisher import FisherPasses, calibration_windows

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    ids = tokenize(lm.tokenizer, load_text(str(text_file)))
    windows = calibration_windows(ids, 48, 1, 0, special_prefix(lm.tokenizer))
    with FisherPasses(lm.model, windows, spill=True) as passes:
        first, second = list(passes), list(passes)
        assert passes._folder is None
    assert all(torch.equal(a.key_grad, b.key_grad) for a, b in zip(first[0], second[0], strict=True))
