"""Shared fixtures: random-weight tiny models of every supported architecture (built once per session).

* ``tiny_llama``, ``tiny_mistral``, ``tiny_qwen2``, ``tiny_gemma3``: one model each.
* ``tiny``: parametrized over all of them (test ids ``[llama]``, ``[mistral]``, ...); yields a :class:`Tiny`.

The models are shared by the whole session: tests must leave them as they found them (``transformed_attention``
restores the attention implementation itself; tests that change anything else build their own model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import ARCHS, save_model_folder, tiny_model

from kvtool.arch import ArchInfo, arch_info
from kvtool.texts import book


@dataclass(frozen=True)
class Tiny:
    """A tiny model with its architecture name and :class:`ArchInfo`."""

    arch: str
    model: Any
    info: ArchInfo


def _build(arch: str) -> Tiny:
    model = tiny_model(arch, seed=0)
    return Tiny(arch, model, arch_info(model.config))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama() -> Tiny:
    return _build("llama")


@pytest.fixture(scope="session")
def tiny_mistral() -> Tiny:
    return _build("mistral")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Tiny:
    return _build("qwen2")


@pytest.fixture(scope="session")
def tiny_gemma3() -> Tiny:
    return _build("gemma3")


@pytest.fixture(scope="session", params=ARCHS, ids=ARCHS)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    """Each tiny model in turn (the same objects as the per-architecture fixtures)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20,000 characters of Persuasion, as a file (``--text``) and the tokenizer's training text."""
    path = tmp_path_factory.mktemp("text") / "persuasion.txt"
    path.write_text(book("persuasion")[:20000])
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """Tiny Llama with head_dim 32 saved as a model folder (every default candidate of the search applies)."""
    return save_model_folder(tmp_path_factory.mktemp("tiny-llama-hd32"), text_file, 32)


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private KVTOOL_HOME and an empty, offline HF cache (CLI tests must not see the user's models)."""
    monkeypatch.setenv("KVTOOL_HOME", str(tmp_path / "kvhome"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
