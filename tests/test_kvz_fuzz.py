"""The structured fuzz suite of the ``.kvz`` reader (generators, oracle and runner: ``tests/kvz_fuzz.py``).

Every case must end in exit 3 with one line, or in a decode bit-identical to the base file's (a consistent forgery
of a different valid file may decode differently: ``may_differ``); never another exit code, a hang, or peak RSS
growth over ``2 × max(decoded output, file size) + 64 MiB`` (see the module docstring of ``kvz_fuzz``).

* ``test_fuzz_fast``: the core cases (one per failure class the issue lists) plus a seeded sample, ~300 cases,
  and three ``kvtool`` subprocesses (a bad flag, ``--calibration /dev/zero``, ``inspect FIFO``).
* ``test_fuzz_full`` (slow): >= 10,000 distinct cases, every subprocess CLI case.

Reproduce or debug one failure: ``.venv/bin/python tests/kvz_fuzz.py --case '<name>'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvz_fuzz import (
    MAY,
    MODES,
    CliWorld,
    Report,
    World,
    cli_cases,
    enumerate_cases,
    parse,
    recompute,
    run_cases,
    run_cli,
    select,
    serialize,
)

FAST_CASES = 300
FULL_CASES = 10_000


@pytest.fixture(scope="module")
def world(tiny_llama, tiny_gemma3, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("kvz-fuzz"), models={"llama": tiny_llama.model, "gemma3": tiny_gemma3.model})


@pytest.fixture(scope="module")
def cases(world: World) -> list:
    return enumerate_cases(world, seed=0)


def _report(report: Report, name: str, path: Path) -> str:
    text = f"\n[{name}]\n{report.table()}\n{report.failure_text(3)}"
    print(text)
    path.write_text(json.dumps(report.to_json(), indent=1, default=str))
    return text


def test_serialiser_and_forger_are_exact(world: World) -> None:
    """The machinery the suite relies on: parse + serialise gives the file back byte for byte, and recomputing
    every checksum of an unedited file changes nothing (so a forged case differs only by its edit)."""
    for base in world.bases.values():
        assert serialize(parse(base.data)) == base.data
        for mode in MODES:
            doc = base.doc.copy()
            recompute(doc, mode)
            assert serialize(doc) == base.data, (base.key, mode)


def test_forgeries_reach_the_decoder(world: World, cases: list, tmp_path: Path) -> None:
    """Consistent forgeries are accepted by the reader when they are harmless, and decode differently when they
    change what the decoder reads: the ``all`` mode really tests the decoder, not the checksums."""
    names = [
        "json/llama-lossless/producer.version/+x@all",
        "json/gemma3-adaptive/producer.version/+x@all",
        "json/llama-lossless/method._data.quality/x2@all",
    ]
    by_name = {c.name: c for c in cases}
    report = run_cases(world, [by_name[n] for n in names], len(names))
    assert [o.status for o in report.outcomes] == ["identical"] * 3, report.failure_text()
    prefix = "chunk/llama-adaptive/chunk.000000.raw/["
    raw = [c for c in cases if c.name.startswith(prefix) and c.name.endswith("*2@all")]
    report = run_cases(world, raw, len(raw))
    assert report.outcomes and all(o.status == "differ" and o.expect == MAY for o in report.outcomes)


def test_selection_is_deterministic(world: World, cases: list) -> None:
    """Same seed, same cases and same bytes; another seed, another sample."""
    a = select(enumerate_cases(world, seed=3), 500, seed=3)[:500]
    b = select(enumerate_cases(world, seed=3), 500, seed=3)[:500]
    assert [c.name for c in a] == [c.name for c in b]
    assert [c.make(world).data for c in a[::25]] == [c.make(world).data for c in b[::25]]
    assert [c.name for c in select(cases, 500, seed=4)][:500] != [c.name for c in a]


def test_fuzz_fast(world: World, cases: list, tmp_path: Path) -> None:
    """The core cases and a seeded sample, ~300 distinct cases, plus three kvtool subprocesses: 0 failures."""
    report = run_cases(world, select(cases, FAST_CASES, seed=0), FAST_CASES)
    report.outcomes += run_cli(CliWorld(world), [c for c in cli_cases() if c.fast])
    _report(report, "fast", tmp_path / "fuzz-fast.json")
    assert len(report.outcomes) >= FAST_CASES
    assert not report.failures(), report.failure_text(5)


@pytest.mark.slow
def test_fuzz_full(world: World, tiny_model_dir: Path, tmp_path: Path) -> None:
    """>= 10,000 distinct structured cases (seed 1) and every kvtool subprocess case: 0 failures."""
    cases = enumerate_cases(world, seed=1)
    report = run_cases(world, select(cases, FULL_CASES, seed=1), FULL_CASES)
    report.outcomes += run_cli(CliWorld(world, model_dir=tiny_model_dir), cli_cases())
    _report(report, "full", tmp_path / "fuzz-full.json")
    assert len(report.outcomes) >= FULL_CASES
    assert not report.failures(), report.failure_text(5)
