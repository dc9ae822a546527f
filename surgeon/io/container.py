"""The safetensors file every surgeon writer produces: tensors plus JSON metadata, one writer and one reader.

Its header (``docs/formats.md``, "Metadata") holds plain strings ``format`` (``"surgeon"``), ``format_version``,
``surgeon_version``, ``class`` and ``layout`` (which export format the tensors are in: ``packed``, ``dense``,
``semi-structured``, ``csr``; files without it are ``packed``), and JSON strings for everything else (``tensors``,
``plan``, ``recipe``, ``extra``, and what a layout adds). Readers dispatch on ``layout``, never on file names.
Every file goes through :func:`write_file` and :func:`read_tensors`, so a check that covers every tensor
(the per-tensor digest) lives in those two functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgeon.errors import SurgeonError, brief
from surgeon.io.atomic import missing_target_error
from surgeon.io.folders import inside
from surgeon.version import __version__

MARKER = "surgeon"
# 1: packed folders; 2: adds the export layouts (an older surgeon refuses those with "upgrade surgeon")
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
DEFAULT_LAYOUT = "packed"
_PLAIN = ("format", "format_version", "surgeon_version", "class", "layout")
_REQUIRED = ("tensors", "plan", "recipe", "extra")
DIGESTS = "digests"  # {tensor name: "b3:" + BLAKE3-128 hex (older files: BLAKE2b-128 hex)}, JSON; written with every file, checked on every read
_DAMAGED_HINT = "the file changed after it was saved (a disk or copy error, or an edit); save or copy it again"


def weights_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a saved model: ``path`` itself, or ``path/model.safetensors`` for a folder."""
    path = Path(path)
    interrupted = missing_target_error(path, "the model")
    if interrupted is not None:
        raise interrupted
    if path.is_dir() or path.suffix != ".safetensors":
        file = path / WEIGHTS
        if not file.is_file():
            raise SurgeonError(
                f"{path} holds no {WEIGHTS}",
                "give a folder written by surgeon.save, `surgeon sparsify` or `surgeon export`",
            )
        inside(path, file)  # never a file linked from outside the folder
        return file
    if not path.is_file():
        raise SurgeonError(f"{path} does not exist", "give a .safetensors file written by surgeon export")
    return path


def to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise SurgeonError(
            f"{what} is not JSON-serializable ({e})", "pass plain dicts, lists, strings and numbers"
        ) from None


def write_file(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, cls: str, layout: str, fields: Mapping[str, Any]
) -> None:
    """Write ``tensors`` with the header above; ``fields`` (JSON values) must include tensors/plan/recipe/extra.

    Writes ``path`` directly: callers write into a temporary name and rename (:mod:`surgeon.io.atomic`).
    """
    missing = [k for k in _REQUIRED if k not in fields]
    assert not missing, f"write_file needs {missing}"
    tensors = dict(tensors)
    metadata = {
        "format": MARKER,
        "format_version": "1" if layout == DEFAULT_LAYOUT else str(FORMAT_VERSION),
        "surgeon_version": __version__,
        "class": cls,
        "layout": layout,
        **{key: to_json(value, key) for key, value in fields.items()},
        DIGESTS: json.dumps(digests(tensors)),
    }
    save_file(tensors, str(path), metadata=metadata)


_BLAKE3 = "b3:"  # digests written since BLAKE3; unprefixed ones (older files) are BLAKE2b-128


def tensor_digest(tensor: torch.Tensor, legacy: bool = False) -> str:
    """``b3:`` + BLAKE3-128 of a tensor's dtype, shape and bytes: any changed bit (even a swap that keeps a count)
    shows. The bytes are hashed where they lie (no copy); ``legacy``: the BLAKE2b-128 of files written before."""
    t = tensor.detach().to("cpu").contiguous()
    head = f"{t.dtype}:{list(t.shape)};".encode()
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
    if legacy:
        old = hashlib.blake2b(head, digest_size=16)
        old.update(data)
        return old.hexdigest()
    h = blake3.blake3(head)
    h.update(data)
    return _BLAKE3 + h.hexdigest(length=16)


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in tensors.items()}


def verify_digests(tensors: Mapping[str, torch.Tensor], recorded: str | None, file: Path) -> None:
    """Compare ``tensors`` with the digests recorded at save (a JSON string; files older than digests have none)."""
    if recorded is None:
        return
    try:
        expected = json.loads(recorded)
    except json.JSONDecodeError:
        expected = None
    if not isinstance(expected, dict):
        raise SurgeonError(f"damaged file: {file} has unreadable digests", _DAMAGED_HINT)
    for name in sorted(set(expected) | set(tensors)):
        recorded_one = expected.get(name)
        legacy = isinstance(recorded_one, str) and not recorded_one.startswith(_BLAKE3)
        if name not in tensors or recorded_one is None or tensor_digest(tensors[name], legacy) != recorded_one:
            raise SurgeonError(
                f"damaged file: {name} in {file} does not match the digest recorded when it was saved", _DAMAGED_HINT
            )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed header of a surgeon file or folder (layout, tensors, plan, recipe, extra, ...); reads no tensors."""
    file = weights_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises untyped errors on corrupt headers
        raise SurgeonError(f"{file} is truncated or corrupt ({brief(e)})", "save the model again") from None
    if raw.get("format") != MARKER:
        raise SurgeonError(f"{file} was not written by surgeon", "load plain checkpoints with surgeon.load_model")
    version = raw.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise SurgeonError(
            f"{file} has format version {version!r}; this surgeon reads up to {FORMAT_VERSION}", "upgrade surgeon"
        )
    try:
        parsed = {k: json.loads(v) for k, v in raw.items() if k not in _PLAIN}
        missing = [k for k in _REQUIRED if k not in parsed]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, json.JSONDecodeError) as e:
        raise SurgeonError(f"{file} has corrupt metadata ({brief(e)})", "save the model again") from None
    return {
        **parsed,
        "format_version": int(version),
        "class": raw.get("class"),
        "surgeon_version": raw.get("surgeon_version"),
        "layout": raw.get("layout", DEFAULT_LAYOUT),
        "file": file,
    }


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file :func:`read_metadata` accepted, each checked against its recorded digest."""
    try:
        with safe_open(str(file), "pt") as f:
            recorded = (f.metadata() or {}).get(DIGESTS)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises untyped errors on corrupt data
        raise SurgeonError(f"{file} is truncated or corrupt ({brief(e)})", "save the model again") from None
    verify_digests(tensors, recorded, file)
    return tensors
