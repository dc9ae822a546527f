"""Save and load masked models: safetensors with kept values + packed masks, metadata as JSON (README, "File format").

A saved model is a folder:

``config.json``
    diffusers models: their own config (``_class_name`` finds the class again). Other modules:
    ``{"_surgeon_class": "module:Class", "_surgeon_init": {...} | null}``, the init arguments taken from a
    ``model.config`` mapping (rebuilt by ``Class.from_config(init)`` when it exists, else ``Class(**init)``).
``model.safetensors``
    for each masked tensor ``P``: ``P.values`` (kept values, row-major, 1-D) and ``P.mask`` (uint8, bits packed
    little-endian along the last dim of the tensor viewed as ``[shape[0], -1]``); every other tensor as it is,
    under its plain name. The metadata holds JSON strings: marker, format version, per-tensor shape/dtype/pattern,
    the plan, the recipe.

N:M tensors are saved as their current N:M projection S(W) only. That is the model the student computes, so
outputs round-trip exactly; the dense W under it is training state, which the resumable training checkpoints
(:mod:`surgeon.checkpoint`) keep. Fine-tuning a loaded N:M model restarts from S(W).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import SurgeonError
from .errors import brief
from .loading import class_path, diffusers_class, is_diffusers_class, read_json, resolve_class
from .plan import LayerPlan, Plan
from .surgery import get_plan, inject, sites

FORMAT = "surgeon"
FORMAT_VERSION = 1
CONFIG, WEIGHTS = "config.json", "model.safetensors"
# Packing works on 8 mask bytes at once, read as one little-endian int64 (torch only runs on little-endian hosts) (byte i = bits 8i..8i+7, each 0 or 1).
# Multiplying by _GATHER moves byte i's bit to bit 56 + i and every cross term out of bits 56..63 (they are
# 56 + 8i - 7j for j != i: distinct, so no carries), leaving the packed byte in the top 8 bits.
_GATHER = 0x0102040810204080
# Unpacking is the inverse by table: byte value → the int64 whose 8 bytes are its bits, 0 or 1.
_SPREAD = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).squeeze(1)


# --- mask packing ------------------------------------------------------------------------------------------------

def _rows_cols(shape) -> tuple[int, int]:
    rows = int(shape[0]) if len(shape) else 1
    return rows, math.prod(shape) // rows if rows else 0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``shape`` → uint8 ``[shape[0], ceil(cols / 8)]``; element 8j+i of a row is bit i of byte j."""
    rows, cols = _rows_cols(mask.shape)
    bits = mask.detach().to("cpu", torch.bool).contiguous().view(torch.uint8).reshape(rows, cols)
    if cols % 8 or bits.storage_offset() % 8:  # int64 views need whole, aligned groups of 8 bytes
        bits = torch.nn.functional.pad(bits, (0, -cols % 8))
    return ((bits.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    rows, cols = _rows_cols(shape)
    bits = _SPREAD[packed.long()].view(torch.uint8)  # [rows, 8 * bytes], one 0/1 byte per element
    return bits[:, :cols].view(torch.bool).reshape(tuple(shape))


# --- what a model becomes on disk --------------------------------------------------------------------------------

def _config_json(model: nn.Module) -> str:
    if is_diffusers_class(type(model)):
        return model.to_json_string()
    config = getattr(model, "config", None)
    init = dict(config) if isinstance(config, Mapping) else getattr(model, "_surgeon_init", None)
    record = {"_surgeon_class": class_path(type(model)), "_surgeon_init": init}
    try:
        return json.dumps(record, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise SurgeonError(f"the config of {type(model).__name__} is not JSON-serializable ({e})",
                           "model.config may hold only JSON values (numbers, strings, lists, dicts)") from None


def _hidden_fqn(key: str) -> str | None:
    """``a.parametrizations.weight.original`` → ``a.weight``: which masked tensor a state_dict key belongs to."""
    head, sep, tail = ("." + key).partition(".parametrizations.")
    return f"{head}.{tail.split('.')[0]}"[1:] if sep else None


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise SurgeonError(f"{what} is not JSON-serializable ({e})", "pass plain dicts, lists, strings and numbers") from None


def _pack_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    masked, model_plan = sites(model), get_plan(model)
    tensors, info, seen = {}, {}, set()
    for key, value in model.state_dict().items():
        if _hidden_fqn(key) in masked:
            continue
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights): store each its own copy
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    for fqn, site in masked.items():
        with torch.no_grad():
            mask = site.mask.detach().to("cpu")
            values = site.original.detach().to("cpu")[mask]
        for key in (f"{fqn}.values", f"{fqn}.mask"):
            if key in tensors:
                raise SurgeonError(f"cannot save: the model has a tensor named {key}", "rename it; surgeon uses that name")
        tensors[f"{fqn}.values"], tensors[f"{fqn}.mask"] = values, pack_mask(mask)
        p = site.parametrization
        info[fqn] = {
            "shape": list(mask.shape),
            "dtype": str(values.dtype).removeprefix("torch."),
            "kind": model_plan.layers[fqn].kind if model_plan and fqn in model_plan.layers else "other",
            "nm": [p.n, p.m] if site.is_nm else None,
            "lambda_w": p.lambda_w if site.is_nm else None,
            "kept": int(values.numel()),
        }
    return tensors, info


@contextmanager
def _atomic_folder(folder: Path, force: bool):
    """Yield a temporary sibling folder; on success it replaces ``folder`` in one rename, on failure it vanishes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(folder, "tmp")
    tmp.mkdir()  # not mkdtemp: that makes the folder private (0700) and the rename would keep it so
    try:
        yield tmp
        if folder.exists() and force:
            # a non-empty folder cannot be renamed over: move it aside first, drop it once the new one is in place
            old = _sibling(folder, "old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(folder: Path, what: str) -> Path:
    return folder.parent / f".{folder.name}.{what}-{uuid.uuid4().hex[:12]}"


def _check_output(folder: Path, force: bool) -> None:
    if folder.exists() and not force and not (folder.is_dir() and not any(folder.iterdir())):
        raise SurgeonError(f"output folder {folder} exists", "pass --force to overwrite")


def save(
    model: nn.Module,
    folder: str | os.PathLike,
    recipe: Any = None,
    force: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (masked or not) to ``folder`` atomically; refuses an existing non-empty folder unless ``force``.

    ``recipe`` (a Recipe or a dict) and ``extra_metadata`` (JSON values) are stored in the metadata.
    """
    folder = Path(folder)
    _check_output(folder, force)
    config = _config_json(model)
    tensors, info = _pack_state(model)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "surgeon_version": __version__,
        "class": class_path(type(model)),
        "tensors": _json(info, "tensor info"),
        "plan": _json(_plan_of(model, info).to_dict() if info else None, "the plan"),
        "recipe": _json(recipe.to_dict() if hasattr(recipe, "to_dict") else recipe, "the recipe"),
        "extra": _json(dict(extra_metadata or {}), "extra_metadata"),
    }
    with _atomic_folder(folder, force) as tmp:
        (tmp / CONFIG).write_text(config)
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)
    return folder


# --- reading and checking ----------------------------------------------------------------------------------------

def _weights_path(folder: Path) -> Path:
    path = folder / WEIGHTS
    if not path.is_file():
        raise SurgeonError(f"{folder} holds no {WEIGHTS}", "give a folder written by surgeon.save or `surgeon sparsify`")
    return path


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a surgeon folder (format, tensors, plan, recipe, extra); reads only the header."""
    path = _weights_path(Path(folder))
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:
        raise SurgeonError(f"{path} is truncated or corrupt ({brief(e)})", "save the model again") from None
    if raw.get("format") != FORMAT:
        raise SurgeonError(f"{path} was not written by surgeon", "load plain checkpoints with surgeon.load_model")
    version = raw.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise SurgeonError(f"{path} has format version {version!r}; this surgeon reads up to {FORMAT_VERSION}",
                           "upgrade surgeon")
    try:
        out = {k: json.loads(raw[k]) for k in ("tensors", "plan", "recipe", "extra")}
    except (KeyError, json.JSONDecodeError) as e:
        raise SurgeonError(f"{path} has corrupt metadata ({brief(e)})", "save the model again") from None
    if not _valid_tensor_info(out["tensors"]):
        raise SurgeonError(f"{path} has corrupt metadata (tensors)", "save the model again")
    return {**out, "format_version": int(version), "class": raw.get("class"), "surgeon_version": raw.get("surgeon_version")}


def _valid_tensor_info(info: Any) -> bool:
    def entry_ok(i: Any) -> bool:
        return (
            isinstance(i, dict)
            and isinstance(i.get("shape"), list) and len(i["shape"]) > 0
            and all(isinstance(n, int) and n > 0 for n in i["shape"])
            and isinstance(i.get("dtype"), str) and isinstance(i.get("kept"), int) and isinstance(i.get("kind"), str)
            and (i.get("nm") is None or (isinstance(i["nm"], list) and len(i["nm"]) == 2))
            and (i.get("lambda_w") is None or isinstance(i["lambda_w"], (int, float)))
        )

    return isinstance(info, dict) and all(entry_ok(i) for i in info.values())


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = read_metadata(folder)
    path = folder / WEIGHTS
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise SurgeonError(f"{path} is truncated or corrupt ({brief(e)})", "save the model again") from None
    return meta, tensors


def _unpack_entry(fqn: str, info: Mapping, tensors: dict[str, torch.Tensor], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one masked tensor of the file, take it out of ``tensors`` and return (kept values, bool mask)."""
    def bad(why: str) -> SurgeonError:
        return SurgeonError(f"{path} is corrupt: {fqn} {why}", "save the model again")

    values, packed = tensors.pop(f"{fqn}.values", None), tensors.pop(f"{fqn}.mask", None)
    if values is None or packed is None:
        raise bad("lacks its .values or .mask tensor")
    shape = tuple(info["shape"])
    rows, cols = _rows_cols(shape)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, -(-cols // 8)):
        raise bad(f"has a packed mask of {list(packed.shape)} {packed.dtype}, expected [{rows}, {-(-cols // 8)}] uint8")
    if values.dim() != 1 or str(values.dtype).removeprefix("torch.") != info["dtype"]:
        raise bad(f"has values of {list(values.shape)} {values.dtype}, expected 1-D {info['dtype']}")
    mask = unpack_mask(packed, shape)
    kept = int(torch.count_nonzero(mask))
    if kept != values.numel() or kept != info["kept"]:
        raise bad(f"keeps {values.numel()} values but its mask has {kept} set bits (metadata: {info['kept']})")
    return values, mask


def _masks_plan(p: Plan) -> set[str]:
    return {f for f, lp in p.layers.items() if not lp.is_dense}


def _plan_of(model: nn.Module, info: Mapping[str, Mapping]) -> Plan:
    """The model's plan, or, if masks were added or removed since it was made, one describing the masks it has."""
    p = get_plan(model)
    if p is not None and _masks_plan(p) == set(info):
        return p
    layers = {
        f: LayerPlan(i["kind"], tuple(i["shape"]), density=None if i["nm"] else i["kept"] / math.prod(i["shape"]),
                     nm=tuple(i["nm"]) if i["nm"] else None)
        for f, i in info.items()
    }
    return Plan(layers)


def _injection_plan(meta: Mapping, path: Path) -> Plan:
    p = Plan.from_dict(meta["plan"]) if meta["plan"] is not None else None
    if p is None or _masks_plan(p) != set(meta["tensors"]):
        raise SurgeonError(f"{path} is corrupt: its plan and its masked tensors differ", "save the model again")
    return p


def _match_state(model: nn.Module, state: Mapping[str, torch.Tensor], masked: Mapping[str, torch.Size], folder: Path) -> None:
    """Every tensor of the model is in the file, plain or masked, with its shape; nothing else is."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {**{k: tuple(v.shape) for k, v in state.items()}, **{k: tuple(v) for k, v in masked.items()}}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise SurgeonError(f"{folder} does not match the model: {', '.join(parts)} tensors",
                           "load into the model class it was saved from")
    for key in sorted(given, key=lambda k: k not in masked):  # masked tensors first: theirs is the telling error
        if given[key] != expected[key]:
            what = "mask shape" if key in masked else "shape"
            raise SurgeonError(f"{what} mismatch for {key}: file has {list(given[key])}, model has {list(expected[key])}",
                               "the file belongs to a different model configuration")


def _restore(model: nn.Module, folder: Path, meta: Mapping, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if sites(model):
        raise SurgeonError("the model already has masks", "load into a plain model (surgeon.remove or fold first)")
    path = folder / WEIGHTS
    entries = {fqn: _unpack_entry(fqn, info, tensors, path) for fqn, info in meta["tensors"].items()}
    _match_state(model, tensors, {fqn: mask.shape for fqn, (_, mask) in entries.items()}, folder)
    # everything is checked: only now is the model touched
    model.load_state_dict(tensors, strict=False)  # the plain tensors; _match_state vouched for the rest
    with torch.no_grad():
        for fqn, (values, mask) in entries.items():
            param = model.get_parameter(fqn)
            param.zero_().masked_scatter_(mask.to(param.device), values.to(param.device, param.dtype))
    if entries:
        nm = {fqn for fqn, info in meta["tensors"].items() if info["nm"]}
        inject(model, _injection_plan(meta, path), masks={f: m for f, (_, m) in entries.items() if f not in nm})
        restored = sites(model)
        for fqn in nm:
            restored[fqn].parametrization.lambda_w = float(meta["tensors"][fqn]["lambda_w"] or 0.0)
    return model


def load_into(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Restore a saved folder into ``model``, a plain module you built; masks are re-injected. Returns ``model``."""
    folder = Path(folder)
    meta, tensors = _read(folder)
    return _restore(model, folder, meta, tensors)


def _build(folder: Path) -> nn.Module:
    config = read_json(folder / CONFIG) if (folder / CONFIG).is_file() else {}
    if "_class_name" in config:
        return diffusers_class(config["_class_name"]).from_config(config)
    if "_surgeon_class" not in config:
        raise SurgeonError(f"{folder} has no {CONFIG} saying which model it holds", "save the model again")
    init = config.get("_surgeon_init")
    if init is None:
        raise SurgeonError(f"{folder} holds a {config['_surgeon_class']} saved without init arguments",
                           "build the model yourself and call surgeon.load_into(model, folder)")
    cls = resolve_class(config["_surgeon_class"])
    try:
        return cls.from_config(init) if hasattr(cls, "from_config") else cls(**init)
    except SurgeonError:
        raise
    except Exception as e:
        raise SurgeonError(f"cannot build {cls.__name__} from {folder / CONFIG}: {type(e).__name__}: {brief(e)}",
                           "build the model yourself and call surgeon.load_into(model, folder)") from None


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the saved model (from its config; nothing downloaded) with its mask parametrizations."""
    folder = Path(folder)
    meta, tensors = _read(folder)
    model = _build(folder)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes != {p.dtype for p in model.parameters()}:
        model.to(dtypes.pop())  # built in fp32 from the config; a half-precision save stays half precision
    return _restore(model, folder, meta, tensors)
