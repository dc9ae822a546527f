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
import logging
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

log = logging.getLogger("surgeon")

MARKER = "surgeon"
# 1: packed folders; 2: adds the export layouts (an older surgeon refuses those with "upgrade surgeon")
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
DEFAULT_LAYOUT = "packed"
_PLAIN = ("format", "format_version", "surgeon_version", "class", "layout")
_REQUIRED = ("tensors", "plan", "recipe", "extra")
DIGESTS = "digests"  # {tensor name: "b3:" + BLAKE3-128 hex (older files: BLAKE2b-128 hex)}, JSON; written with every file, checked on every read
# {"metadata": digest of every other header entry, "config": digest of the folder's config.json or null}: what
# rebuilds or reinterprets the model (class, config, layout, plan, recipe, pipeline) is covered like the tensors
INTEGRITY = "integrity"
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


def readable_path(file: str | os.PathLike) -> str:
    """``file`` as safetensors opens it; a path whose bytes are not valid UTF-8 (which safetensors cannot open) is
    refused by name, not reported as a corrupt file."""
    try:
        os.fsencode(file).decode("utf-8")
    except UnicodeDecodeError:
        shown = os.fsencode(file).decode("utf-8", "backslashreplace")
        raise SurgeonError(
            f"cannot read {shown}: its path is not valid UTF-8, which safetensors cannot open",
            "rename the file or folder to a UTF-8 name",
        ) from None
    return str(file)


def to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise SurgeonError(
            f"{what} is not JSON-serializable ({e})", "pass plain dicts, lists, strings and numbers"
        ) from None


def write_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    cls: str,
    layout: str,
    fields: Mapping[str, Any],
    config: str | None = None,
) -> None:
    """Write ``tensors`` with the header above; ``fields`` (JSON values) must include tensors/plan/recipe/extra;
    ``config``: the JSON text of the ``config.json`` written beside the file, which the header's digest covers.

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
    metadata[INTEGRITY] = json.dumps(
        {"metadata": record_digest(metadata), "config": record_digest(json.loads(config)) if config else None}
    )
    save_file(tensors, str(path), metadata=metadata)


def record_digest(value: Any) -> str:
    """BLAKE2b-128 of a JSON value in canonical form (sorted keys): re-indenting a config.json changes nothing."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


_noticed: set[Path] = set()


def verify_integrity(meta: Mapping[str, Any], config: bool = True) -> None:
    """Refuse a file whose header (or, with ``config``, whose ``config.json`` beside it) changed after it was saved.

    Readers call it once the model is built and checked, so a damaged entry that a format check names is reported
    by that check. A file written before the header had a digest loads with a one-time notice."""
    file, recorded = Path(meta["file"]), meta.get(INTEGRITY)
    if recorded is None:
        if file not in _noticed:
            _noticed.add(file)
            log.warning(
                "notice: %s was saved by surgeon %s, before its config and metadata had a digest: only its tensors "
                "are checked (save it again to cover them)",
                file,
                meta.get("surgeon_version") or "(unknown)",
            )
        return
    if not (isinstance(recorded, dict) and isinstance(recorded.get("metadata"), str)):
        raise SurgeonError(f"damaged file: {file} has an unreadable integrity record", _DAMAGED_HINT)
    if recorded["metadata"] != meta["header_digest"]:
        raise SurgeonError(
            f"damaged file: the metadata of {file} does not match the digest recorded when it was saved", _DAMAGED_HINT
        )
    if config and recorded.get("config") is not None:
        config_file = file.parent / "config.json"
        try:
            text = inside(file.parent, config_file).read_text()
            value = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError):
            value = None
        if record_digest(value) != recorded["config"]:
            raise SurgeonError(
                f"damaged file: {config_file} does not match the digest recorded in {file.name} when it was saved",
                _DAMAGED_HINT,
            )


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
    name = readable_path(file)
    try:
        with safe_open(name, "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises untyped errors on corrupt headers
        raise SurgeonError(f"{file} is truncated or corrupt ({brief(e)})", "save the model again") from None
    if raw.get("format") != MARKER:
        raise SurgeonError(f"{file} was not written by surgeon", "load plain checkpoints with surgeon.load_model")
    version = raw.get("format_version", "")
    if not (isinstance(version, str) and version.isascii() and version.isdigit()) or int(version) > FORMAT_VERSION:
        raise SurgeonError(
            f"{file} has format version {version!r}; this surgeon reads up to {FORMAT_VERSION}", "upgrade surgeon"
        )
    parsed = {k: parse_entry(file, k, v) for k, v in raw.items() if k not in _PLAIN}
    for key in _REQUIRED:
        if key not in parsed:
            raise corrupt_metadata(file, key, "is missing")
    for key, types in _TYPES.items():
        if key in parsed and not isinstance(parsed[key], types):
            expected = " or ".join("null" if t is type(None) else "a JSON object" for t in types)
            raise corrupt_metadata(file, key, f"is {_json_type(parsed[key])}, expected {expected}")
    return {
        **parsed,
        "header_digest": record_digest({k: v for k, v in raw.items() if k != INTEGRITY}),
        "format_version": int(version),
        "class": raw.get("class"),
        "surgeon_version": raw.get("surgeon_version"),
        "layout": raw.get("layout", DEFAULT_LAYOUT),
        "file": file,
    }


# the JSON type each entry must have where it is read (``tensors`` entries: surgeon.formats.packed.check_tensor_info)
_TYPES: dict[str, tuple[type, ...]] = {
    "tensors": (dict,),
    "plan": (dict, type(None)),
    "recipe": (dict, type(None)),
    "extra": (dict,),
    "config": (dict,),
    DIGESTS: (dict,),
    INTEGRITY: (dict,),
}
_MAX_DEPTH = 64  # deeper JSON is no metadata surgeon writes; Python's parser would recurse into a RecursionError


def corrupt_metadata(file: str | os.PathLike, key: str, what: str) -> SurgeonError:
    """The one error for a metadata value of the wrong form: ``corrupt metadata in FILE: KEY ...``."""
    return SurgeonError(f"corrupt metadata in {file}: {key} {what}", "the file is damaged; save the model again")


def _json_type(value: Any) -> str:
    names = {dict: "a JSON object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_entry(file: str | os.PathLike, key: str, text: Any) -> Any:
    """One JSON metadata entry parsed strictly: no NaN/Infinity, no numbers beyond float range, bounded nesting."""
    if not isinstance(text, str):
        raise corrupt_metadata(file, key, "is not text")
    if _depth(text) > _MAX_DEPTH:
        raise corrupt_metadata(file, key, f"is nested deeper than {_MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise corrupt_metadata(file, key, f"is not valid JSON ({brief(e)})") from None


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file :func:`read_metadata` accepted, each checked against its recorded digest."""
    name = readable_path(file)
    try:
        with safe_open(name, "pt") as f:
            recorded = (f.metadata() or {}).get(DIGESTS)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises untyped errors on corrupt data
        raise SurgeonError(f"{file} is truncated or corrupt ({brief(e)})", "save the model again") from None
    verify_digests(tensors, recorded, file)
    return tensors
