"""Read the tensors of a PyTorch ``.pth`` state dict without unpickling it.

A ``.pth`` file is a pickle, and unpickling runs whatever the file names. Some weights we need (the EfficientNet-Lite0
feature extractor for FID) only ship that way, so this module interprets the pickle's opcodes itself, as data:
it accepts only the small subset a state dict of tensors uses (dicts, lists, tuples, strings, numbers, the
``OrderedDict`` / ``_rebuild_tensor_v2`` / ``torch.*Storage`` globals and persistent storage ids) and refuses
everything else with a SurgeonError, before any object is built. No Python callable named by the file is ever
called: the allowed globals map to the interpreter's own constructors.

Both on-disk layouts are read: the zip archive of torch >= 1.6 (``*/data.pkl`` plus one raw file per storage) and
the legacy stream (magic number, protocol, system info, the state-dict pickle, the storage keys, then each storage
as an int64 element count followed by its raw little-endian bytes).
"""

from __future__ import annotations

import io
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.errors import SurgeonError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _Global:
    name: str  # "module qualname", as the GLOBAL opcode spells it


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


_MARK = object()
_ORDERED_DICT = "collections OrderedDict"
_REBUILD = ("torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor")
_PARAMETER = "torch._utils _rebuild_parameter"


def _allowed_global(name: str) -> _Global:
    module, _, attr = name.partition(" ")
    if name == _ORDERED_DICT or name in _REBUILD or name == _PARAMETER:
        return _Global(name)
    if module == "torch" and attr in STORAGE_DTYPES:
        return _Global(name)
    raise SurgeonError(
        f"the weights file names {module}.{attr}, which a plain tensor state dict never does",
        "only state dicts of tensors are read; re-save the weights with safetensors",
    )


def _refuse(op: str, why: str = "") -> SurgeonError:
    return SurgeonError(
        f"the weights file uses pickle opcode {op}{why}, outside the tensor state-dict subset",
        "only state dicts of tensors are read; re-save the weights with safetensors",
    )


def _interpret(stream: io.BufferedIOBase, what: str):
    """Run one pickle (up to its STOP) as data; returns the value, with tensors as ``_TensorRef``."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    try:
        ops = pickletools.genops(stream)
        for op, arg, _pos in ops:
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1:
                    raise _refuse(name, " with a malformed stack")
                return stack[0]
            if name == "MARK":
                marks.append(len(stack))
            elif name in (
                "BINUNICODE",
                "SHORT_BINUNICODE",
                "BINUNICODE8",
                "BININT",
                "BININT1",
                "BININT2",
                "LONG1",
                "BINFLOAT",
            ):
                stack.append(arg)
            elif name in ("SHORT_BINSTRING", "BINSTRING"):
                stack.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif name == "NONE":
                stack.append(None)
            elif name == "NEWTRUE":
                stack.append(True)
            elif name == "NEWFALSE":
                stack.append(False)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                items = tuple(stack[-k:])
                del stack[-k:]
                stack.append(items)
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _as(stack[-1], dict, name)[key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                target = _as(stack[-1], dict, name)
                for k, v in zip(items[::2], items[1::2]):
                    target[k] = v
            elif name == "APPEND":
                value = stack.pop()
                _as(stack[-1], list, name).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                _as(stack[-1], list, name).extend(items)
            elif name == "GLOBAL":
                stack.append(_allowed_global(arg))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(_allowed_global(f"{module} {attr}"))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                stack.append(_reduce(func, args))
            elif name == "BUILD":
                state = stack.pop()  # OrderedDict's _metadata (per-module versions): not needed for tensors
                if not isinstance(stack[-1], dict) or not isinstance(state, (dict, type(None))):
                    raise _refuse(name, " on something other than a dict")
            elif name == "BINPERSID":
                stack.append(_storage(stack.pop()))
            else:
                raise _refuse(name)
    except SurgeonError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, struct.error) as e:
        raise SurgeonError(
            f"{what} is not a readable torch state dict ({e})",
            "check the file, or re-save the weights with safetensors",
        ) from e
    raise SurgeonError(f"{what} ends before its pickle does", "the file is truncated; reinstall or re-download it")


def _as(obj, kind: type, op: str):
    if not isinstance(obj, kind):
        raise _refuse(op, f" on a {type(obj).__name__}")
    return obj


def _reduce(func, args):
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        raise _refuse("REDUCE", " on something other than an allowed global")
    if func.name == _ORDERED_DICT:
        if args:
            raise _refuse("REDUCE", " with OrderedDict arguments")
        return {}
    if func.name in _REBUILD:
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, _StorageRef):
            raise _refuse("REDUCE", " rebuilding a tensor from something other than a storage")
        return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    if func.name == _PARAMETER:
        return args[0]  # a Parameter is its tensor here
    raise _refuse("REDUCE", f" calling {func.name}")


def _storage(pid):
    """Zip layout: ('storage', type, key, location, numel); legacy adds view metadata (must be None)."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _Global)):
        raise _refuse("BINPERSID", " with an id that is not a tensor storage")
    if len(pid) == 6 and pid[5] is not None:
        raise _refuse("BINPERSID", " with a storage view")
    attr = pid[1].name.partition(" ")[2]
    if attr not in STORAGE_DTYPES:
        raise _refuse("BINPERSID", f" with storage type {attr}")
    return _StorageRef(str(pid[2]), STORAGE_DTYPES[attr], int(pid[4]))


def _tensors(value, storages: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict):
        raise SurgeonError(
            f"{what} holds a {type(value).__name__}, not a state dict", "pass a file saved from state_dict()"
        )
    out = {}
    for name, ref in value.items():
        if not isinstance(ref, _TensorRef):
            continue  # non-tensor entries (none in a state dict) are ignored as data
        flat = storages[ref.storage.key]
        out[str(name)] = torch.as_strided(flat, ref.size, ref.stride, ref.offset).clone()
    return out


def _from_bytes(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _refs(value) -> dict[str, _StorageRef]:
    return (
        {r.storage.key: r.storage for r in value.values() if isinstance(r, _TensorRef)}
        if isinstance(value, dict)
        else {}
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the state dict saved in ``path`` (zip or legacy layout), read without unpickling."""
    path = Path(path)
    what = f"weights file {path}"
    if not path.is_file():
        raise SurgeonError(f"{what} does not exist", "check the path")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise SurgeonError(f"{what} is a zip without one data.pkl", "pass a file written by torch.save")
            prefix = pkl[0][: -len("data.pkl")]
            value = _interpret(io.BytesIO(z.read(pkl[0])), what)
            storages = {}
            for key, ref in _refs(value).items():
                try:
                    raw = z.read(f"{prefix}data/{key}")
                except KeyError as e:
                    raise SurgeonError(f"{what} lacks the data of storage {key}", "the file is damaged") from e
                storages[key] = _from_bytes(raw, ref.dtype)
            return _tensors(value, storages, what)
    with open(path, "rb") as f:
        if _interpret(f, what) != LEGACY_MAGIC:
            raise SurgeonError(f"{what} is neither a zip nor a legacy torch file", "pass a file written by torch.save")
        _interpret(f, what)  # protocol version
        _interpret(f, what)  # system info (endianness, type sizes)
        value = _interpret(f, what)
        keys = _interpret(f, what)
        refs = _refs(value)
        storages = {}
        for key in keys if isinstance(keys, list) else []:
            (numel,) = struct.unpack("<q", f.read(8))
            ref = refs.get(str(key))
            if ref is None:
                raise SurgeonError(f"{what} stores data no tensor uses ({key})", "the file is damaged")
            nbytes = numel * torch.empty((), dtype=ref.dtype).element_size()
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise SurgeonError(f"{what} is truncated in storage {key}", "reinstall or re-download it")
            storages[str(key)] = _from_bytes(raw, ref.dtype)
        missing = set(refs) - set(storages)
        if missing:
            raise SurgeonError(f"{what} lacks the data of {len(missing)} storages", "the file is damaged")
        return _tensors(value, storages, what)
