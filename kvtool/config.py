"""Versioned, allow-listed serialization of method configs (``{"_type", "_version", "_data"}``).

Every method object *is* its config: a frozen dataclass whose fields are its hyper-parameters, validated in
``__post_init__`` with ``ValueError``. :func:`register` adds a class to the allow-list that :func:`from_dict`
accepts; nothing else can be instantiated from a file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from kvtool.errors import ArtifactError, KvtoolError

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: allow ``cls`` (a dataclass with a ``version`` class attribute) in artifacts."""
    _REGISTRY[cls.__name__] = cls
    return cls


def to_dict(obj: Any) -> dict[str, Any]:
    """``{"_type": class name, "_version": int, "_data": fields}`` of a registered dataclass."""
    skip = set(getattr(type(obj), "tensor_fields", ()))  # stored as artifact tensors, not JSON
    data = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init and f.name not in skip}
    return {"_type": type(obj).__name__, "_version": type(obj).version, "_data": data}


def from_dict(d: dict[str, Any]) -> Any:
    """Inverse of :func:`to_dict`; unknown types, newer versions and unknown fields are artifact errors."""
    try:
        cls = _REGISTRY[d["_type"]]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"unknown method type {d.get('_type') if isinstance(d, dict) else d!r}") from e
    version = d.get("_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{d['_type']}: bad _version {d.get('_version')!r}")
    if version > cls.version:
        raise ArtifactError(
            f"{d['_type']} version {d['_version']} is newer than this kvtool supports ({cls.version}); upgrade kvtool"
        )
    names = {f.name for f in dataclasses.fields(cls) if f.init} - set(getattr(cls, "tensor_fields", ()))
    if not isinstance(d.get("_data", {}), dict):
        raise ArtifactError(f"{d['_type']}: _data must be an object")
    extra = set(d.get("_data", {})) - names
    if extra:
        raise ArtifactError(f"{d['_type']}: unknown fields {sorted(extra)}")
    try:
        return cls(**d.get("_data", {}))
    except (TypeError, ValueError, KvtoolError) as e:  # settings a config refuses: the file is at fault
        raise ArtifactError(f"{d['_type']}: {e}") from e
