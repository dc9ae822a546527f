"""surgeon's own format: kept values + 1-bit packed masks in safetensors (``docs/formats.md``, "Packed folders").

A saved model is a folder: ``config.json`` (:func:`surgeon.io.classes.config_record`) and ``model.safetensors``
holding, for each masked tensor ``P``, ``P.values`` (kept values, row-major, 1-D) and ``P.mask``
(:func:`surgeon.io.bitpack.pack_mask`), every other tensor as it is under its plain name; the header
(:mod:`surgeon.io.container`) holds per-tensor shape/dtype/pattern, the plan and the recipe.

N:M tensors are saved as their current N:M projection S(W) only. That is the model the student computes, so
outputs round-trip exactly; the dense W under it is training state, which the resumable training checkpoints
(:mod:`surgeon.training.checkpoint`) keep. Fine-tuning a loaded N:M model restarts from S(W).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError, check_module, check_path
from surgeon.io.atomic import atomic_folder, atomic_path, check_output
from surgeon.io.bitpack import kept_values, pack_mask, packed_shape, unpack_mask
from surgeon.io.classes import build_from_record, class_path, config_record, read_json, trusting_code
from surgeon.io.container import WEIGHTS, corrupt_metadata, read_metadata, read_tensors, verify_integrity, write_file
from surgeon.io.folders import inside
from surgeon.io.lock import exclusive
from surgeon.masking.plan import LayerPlan, Plan
from surgeon.masking.surgery import Site, get_plan, inject, masked_fqns, sites

CONFIG = "config.json"
LAYOUT = "packed"


# --- writing -----------------------------------------------------------------------------------------------------


def _hidden_fqn(key: str) -> str | None:
    """``a.parametrizations.weight.original`` → ``a.weight``: which masked tensor a state_dict key belongs to."""
    head, sep, tail = ("." + key).partition(".parametrizations.")
    return f"{head}.{tail.split('.')[0]}"[1:] if sep else None


def plain_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every state tensor that is not behind a mask, on CPU, floating ones cast to ``dtype`` when given."""
    masked, tensors, seen = sites(model), {}, set()
    for key, value in model.state_dict().items():
        if _hidden_fqn(key) in masked:
            continue
        value = value.detach().to("cpu").contiguous()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        # safetensors refuses tensors sharing storage (tied weights): store each its own copy
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return tensors


def _claim(tensors: Mapping[str, torch.Tensor], *keys: str) -> None:
    for key in keys:
        if key in tensors:
            raise SurgeonError(f"cannot save: the model has a tensor named {key}", "rename it; surgeon uses that name")


def tensor_info(site: Site, values: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The header entry of one masked tensor (shape, dtype, kind, N:M pattern, kept count)."""
    p = site.parametrization
    return {
        "shape": list(mask.shape),
        "dtype": str(values.dtype).removeprefix("torch."),
        "kind": p.layer.kind if p.layer is not None else "other",
        "nm": [p.n, p.m] if site.is_nm else None,
        "lambda_w": p.lambda_w if site.is_nm else None,
        "kept": int(values.numel()),
    }


def encode(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The packed tensors of ``model`` and the header entry of each masked tensor."""
    tensors, info = plain_state(model, dtype), {}
    for fqn, site in sites(model).items():
        with torch.no_grad():
            mask = site.mask.detach().to("cpu")
            values = kept_values(site.original, mask)
        if dtype is not None:
            values = values.to(dtype)
        _claim(tensors, f"{fqn}.values", f"{fqn}.mask")
        tensors[f"{fqn}.values"], tensors[f"{fqn}.mask"] = values, pack_mask(mask)
        info[fqn] = tensor_info(site, values, mask)
    return tensors, info


def header_fields(
    model: nn.Module, info: Mapping[str, Mapping], recipe: Any = None, extra_metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON header fields every layout writes: per-tensor info, the plan, the recipe, extra metadata."""
    return {
        "tensors": dict(info),
        "plan": plan_of(model, info).to_dict() if info else None,
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "extra": dict(extra_metadata or {}),
    }


def write_model(
    model: nn.Module,
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    layout: str,
    fields: Mapping[str, Any],
    force: bool,
) -> Path:
    """Write a surgeon file atomically (refused if ``out`` exists, unless ``force``).

    ``out`` ending in ``.safetensors`` becomes one self-describing file, the config record inside its metadata
    (``config``); anything else a folder with ``config.json`` and ``model.safetensors``.
    """
    with exclusive(out):  # one writer per output, also across threads
        return _write_model(model, out, tensors, layout, fields, force)


def _write_model(
    model: nn.Module,
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    layout: str,
    fields: Mapping[str, Any],
    force: bool,
) -> Path:
    check_output(out, force)
    config = config_record(model)
    if out.suffix == ".safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            write_file(
                tmp,
                tensors,
                cls=class_path(type(model)),
                layout=layout,
                fields={**fields, "config": json.loads(config)},
            )
        return out
    with atomic_folder(out, force) as tmp:
        (tmp / CONFIG).write_text(config)
        write_file(tmp / WEIGHTS, tensors, cls=class_path(type(model)), layout=layout, fields=fields, config=config)
    return out


def save(
    model: nn.Module,
    folder: str | os.PathLike,
    recipe: Any = None,
    force: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (masked or not) to ``folder`` atomically; refuses an existing non-empty folder unless ``force``.

    A ``folder`` ending in ``.safetensors`` becomes one self-describing file instead (``docs/formats.md``).

    ``recipe`` (a Recipe or a dict) and ``extra_metadata`` (JSON values) are stored in the metadata; ``dtype``
    casts every floating tensor on the way out (the model itself is not changed).
    """
    check_module(model)
    check_path(folder, "folder")
    folder = Path(folder)
    check_output(folder, force)
    config_record(model)  # an unserializable config is refused before any work
    tensors, info = encode(model, dtype)
    return write_model(model, folder, tensors, LAYOUT, header_fields(model, info, recipe, extra_metadata), force)


# --- reading and checking ----------------------------------------------------------------------------------------


def check_tensor_info(meta: Mapping[str, Any]) -> None:
    """Refuse a header whose per-tensor entries are malformed (before any tensor is read), naming the entry."""

    def positive_ints(v: Any, length: int | None = None) -> bool:
        return (
            isinstance(v, list)
            and len(v) > 0
            and (length is None or len(v) == length)
            and all(type(n) is int and n > 0 for n in v)
        )

    checks = (
        ("shape", lambda v: positive_ints(v), "a list of positive integers"),
        ("dtype", lambda v: isinstance(v, str), "a dtype name"),
        ("kept", lambda v: type(v) is int and v >= 0, "a count"),
        ("kind", lambda v: isinstance(v, str), "a layer kind"),
        ("nm", lambda v: v is None or positive_ints(v, 2), "null or [N, M]"),
        ("lambda_w", lambda v: v is None or (type(v) in (int, float)), "null or a number"),
    )
    info = meta["tensors"]
    for fqn, entry in info.items():
        if not isinstance(entry, dict):
            raise corrupt_metadata(meta["file"], "tensors", f"entry {fqn} is not a JSON object")
        for field_name, ok, expected in checks:
            if not ok(entry.get(field_name)):  # nm and lambda_w may be absent (files of surgeon 0.1 lack them)
                raise corrupt_metadata(
                    meta["file"],
                    "tensors",
                    f"entry {fqn}: {field_name} {entry.get(field_name)!r:.40} is not {expected}",
                )


def corrupt(path: Path, fqn: str, why: str) -> SurgeonError:
    return SurgeonError(f"{path} is corrupt: {fqn} {why}", "save the model again")


def unpack_entry(
    fqn: str, info: Mapping, tensors: dict[str, torch.Tensor], path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one masked tensor of the file, take it out of ``tensors`` and return (kept values, bool mask)."""
    values, packed = tensors.pop(f"{fqn}.values", None), tensors.pop(f"{fqn}.mask", None)
    if values is None or packed is None:
        raise corrupt(path, fqn, "lacks its .values or .mask tensor")
    shape = tuple(info["shape"])
    want = packed_shape(shape)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        raise corrupt(
            path, fqn, f"has a packed mask of {list(packed.shape)} {packed.dtype}, expected {list(want)} uint8"
        )
    if values.dim() != 1 or str(values.dtype).removeprefix("torch.") != info["dtype"]:
        raise corrupt(path, fqn, f"has values of {list(values.shape)} {values.dtype}, expected 1-D {info['dtype']}")
    mask = unpack_mask(packed, shape)
    kept = int(torch.count_nonzero(mask))
    if kept != values.numel() or kept != info["kept"]:
        raise corrupt(
            path, fqn, f"keeps {values.numel()} values but its mask has {kept} set bits (metadata: {info['kept']})"
        )
    return values, mask


def plan_of(model: nn.Module, info: Mapping[str, Mapping]) -> Plan:
    """The model's plan, or, if masks were added or removed since it was made, one describing the masks it has."""
    p = get_plan(model)
    if p is not None and masked_fqns(p) == set(info):
        return p
    layers = {
        f: LayerPlan(
            i["kind"],
            tuple(i["shape"]),
            density=None if i["nm"] else i["kept"] / math.prod(i["shape"]),
            nm=tuple(i["nm"]) if i["nm"] else None,
        )
        for f, i in info.items()
    }
    return Plan(layers)


def _injection_plan(meta: Mapping, path: Path) -> Plan:
    try:
        p = Plan.from_dict(meta["plan"]) if meta["plan"] is not None else None
    except (SurgeonError, AttributeError) as e:
        raise corrupt_metadata(meta["file"], "plan", f"is malformed ({getattr(e, 'message', e)})") from None
    if p is None or masked_fqns(p) != set(meta["tensors"]):
        raise SurgeonError(f"{path} is corrupt: its plan and its masked tensors differ", "save the model again")
    return p


def match_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], masked: Mapping[str, torch.Size], where: Path
) -> None:
    """Every tensor of the model is in the file, plain or masked, with its shape; nothing else is."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {**{k: tuple(v.shape) for k, v in state.items()}, **{k: tuple(v) for k, v in masked.items()}}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise SurgeonError(
            f"{where} does not match the model: {', '.join(parts)} tensors",
            "load into the model class it was saved from",
        )
    for key in sorted(given, key=lambda k: k not in masked):  # masked tensors first: theirs is the telling error
        if given[key] != expected[key]:
            what = "mask shape" if key in masked else "shape"
            raise SurgeonError(
                f"{what} mismatch for {key}: file has {list(given[key])}, model has {list(expected[key])}",
                "the file belongs to a different model configuration",
            )


def restore_masked(
    model: nn.Module,
    meta: Mapping,
    entries: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    plain: Mapping[str, torch.Tensor],
) -> nn.Module:
    """Put checked plain tensors and (values, mask) pairs into ``model`` and re-inject its masks."""
    path = meta["file"]
    if sites(model):
        raise SurgeonError("the model already has masks", "load into a plain model (surgeon.remove or fold first)")
    match_state(model, plain, {fqn: mask.shape for fqn, (_, mask) in entries.items()}, path.parent)
    # everything is checked: only now is the model touched
    # a model built empty (parameters on the meta device) takes the file's tensors themselves: no second copy
    empty = any(p.is_meta for p in model.parameters())
    model.load_state_dict(dict(plain), strict=False, assign=empty)  # match_state vouched for the rest
    with torch.no_grad():
        for fqn, (values, mask) in entries.items():
            param = model.get_parameter(fqn)
            if param.is_meta:
                full = torch.zeros(param.shape, dtype=param.dtype).masked_scatter_(mask, values.to(param.dtype))
                module_name, _, name = fqn.rpartition(".")
                model.get_submodule(module_name).register_parameter(name, nn.Parameter(full, param.requires_grad))
            else:
                param.zero_().masked_scatter_(mask.to(param.device), values.to(param.device, param.dtype))
    if any(p.is_meta for p in model.parameters()):  # match_state makes this impossible; never hand out a shell
        raise SurgeonError(f"{path} does not hold every tensor of the model", "save the model again")
    if entries:
        nm = {fqn for fqn, info in meta["tensors"].items() if info["nm"]}
        # the masks are this reader's own (just unpacked) and the weights were just written 0 wherever they prune
        masks = {f: m for f, (_, m) in entries.items() if f not in nm}
        inject(model, _injection_plan(meta, path), masks=masks, adopt=True)
        restored = sites(model)
        for fqn in nm:
            restored[fqn].parametrization.lambda_w = float(meta["tensors"][fqn]["lambda_w"] or 0.0)
    return model


def restore(model: nn.Module, meta: Mapping, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Load a packed file's tensors into ``model``; checks everything before touching it."""
    check_tensor_info(meta)
    entries = {fqn: unpack_entry(fqn, info, tensors, meta["file"]) for fqn, info in meta["tensors"].items()}
    return restore_masked(model, meta, entries, tensors)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and tensors of a packed folder."""
    meta = read_metadata(path)
    if meta["layout"] != LAYOUT:
        raise SurgeonError(
            f"{meta['file']} holds the {meta['layout']} layout, not packed masks",
            "load it with surgeon.load(path) or surgeon.load_model(path)",
        )
    check_tensor_info(meta)
    return meta, read_tensors(meta["file"])


def load_into(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Restore a saved folder into ``model``, a plain module you built; masks are re-injected. Returns ``model``."""
    check_module(model)
    check_path(folder, "folder")
    meta, tensors = read(folder)
    verify_integrity(meta, config=False)  # the model is yours, not the recorded config's; checked before it changes
    return restore(model, meta, tensors)


def build(
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    empty: bool = False,
) -> nn.Module:
    """A fresh model of the class a file records, in the floating dtype its tensors have.

    ``config`` is the model's config record; by default the file's own ``config`` entry or ``config.json`` next to it.
    ``empty``: parameters on the meta device where the class allows it (:func:`build_from_record`), for a reader
    that assigns all of them.
    """
    file = meta["file"]
    if config is None and isinstance(meta.get("config"), dict):  # a one-file export carries its config inside
        config = meta["config"]
    if config is None:
        config_file = file.parent / CONFIG
        config = read_json(inside(file.parent, config_file)) if config_file.is_file() else {}
        where = file.parent / CONFIG
    else:
        where = file
    model = build_from_record(config, where, empty)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes != {p.dtype for p in model.parameters()}:
        # built in fp32 from the config; a half-precision save stays half precision (nn.Module.to, not diffusers'
        # override, which logs a warning about fp32 modules even when there are none)
        nn.Module.to(model, dtypes.pop())
    return model


def dense_entries(meta: Mapping, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors with every ``values+mask`` entry checked, then scattered back to a dense weight (zeros where
    pruned), one at a time: a mask lives only while its weight is filled (both passes unpack it: 0.1 ns a bit)."""
    masked = {fqn: info for fqn, info in meta["tensors"].items() if info.get("storage", "values+mask") == "values+mask"}
    probe = dict(tensors)
    for fqn, info in masked.items():  # every entry checked before any is taken out
        unpack_entry(fqn, info, probe, meta["file"])
    for fqn, info in masked.items():
        values, mask = unpack_entry(fqn, info, tensors, meta["file"])
        tensors[fqn] = torch.zeros(mask.shape, dtype=values.dtype).masked_scatter_(mask, values)
        del mask
    return tensors


def load(folder: str | os.PathLike, trust_code: bool = False, folded: bool = False) -> nn.Module:
    """Rebuild the saved model (from its config; nothing downloaded) with its mask parametrizations.

    A config naming a class outside diffusers and surgeon's own models (a ``file.py:Class`` or another module) is
    refused unless ``trust_code=True``: importing it would run its code. ``folded``: a plain model with the masks
    folded in (what ``fold`` of the loaded model gives), built without ever holding the masks of all layers at once.
    """
    meta, tensors = read(folder)
    with trusting_code(trust_code):
        model = build(meta, tensors, empty=True)
        if folded:  # read() checked the tensor entries
            state = dense_entries(meta, tensors)
            match_state(model, state, {}, meta["file"].parent)
            model.load_state_dict(state, strict=True, assign=True)
        else:
            model = restore(model, meta, tensors)
    verify_integrity(meta)
    return model
