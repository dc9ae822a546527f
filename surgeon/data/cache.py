"""The user cache directory for derived data (parsed strokes, rendered glyphs), with atomic writes.

Derived data never goes into the repository (KanjiVG is CC BY-SA): it lives in the platform's user cache
directory, or wherever the environment variable ``SURGEON_CACHE`` points. Files are written under a temporary
name and moved into place with ``os.replace``, so a reader (or a second process building the same file) never
sees a half-written file. Cache files are safetensors with a JSON header that says what they were built from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from surgeon.io.atomic import atomic_path

__all__ = ["ENV_VAR", "atomic_path", "cache_dir", "cache_key", "load_cached", "save_cached"]

ENV_VAR = "SURGEON_CACHE"


def cache_dir(*parts: str) -> Path:
    """``<cache root>/<parts...>``, created on demand; the root is ``$SURGEON_CACHE`` or the user cache dir."""
    root = os.environ.get(ENV_VAR) or platformdirs.user_cache_dir("surgeon", appauthor=False)
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(params: dict) -> str:
    """A short stable hash of JSON-able parameters: any parameter change gives a different file name."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(path: str | os.PathLike, header: dict) -> dict | None:
    """Tensors of a cache file plus its metadata under ``"_meta"``; None when it is missing, corrupt or stale.

    ``header`` holds everything the content depends on (format, version, parameters); a file whose stored header
    differs in any key is ignored, so a changed parameter can never reuse old data even on a key collision.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("surgeon", "null"))
            if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in header.items()):
                return None
            return {k: f.get_tensor(k) for k in f.keys()} | {"_meta": meta}
    except (OSError, ValueError, SafetensorError):  # a truncated or corrupt file is rebuilt, not trusted
        return None


def save_cached(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` with ``meta`` (JSON, as the "surgeon" metadata entry) atomically."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"surgeon": json.dumps(meta, sort_keys=True)})
