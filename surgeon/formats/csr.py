"""``csr``: compressed sparse rows for the layers where that is measured faster on CPU (``docs/formats.md``, "CSR").

Eligible modules: ``nn.Linear``, 1×1 convolutions (stride 1, no padding, one group) and GRU/LSTM (their input
projections ``weight_ih_l*``). With ``layers="auto"`` each eligible module whose weights are at most half dense is
timed at export (fastest of interleaved repeats), dense against CSR, on the very input it sees in one denoising
step of the model; it is converted
only when CSR takes at most 0.9× the dense time, and the choice is kept only if one whole denoising step with all
chosen modules converted also takes at most 0.9× the dense step. ``layers="all"`` converts every eligible module.
A converted weight ``P`` is stored as ``P.crow`` / ``P.col`` (int32) / ``P.values``; other masked weights as in
``packed``;
the header's ``csr`` entry names the converted modules with their measured times. Loading gives the same model
with those modules replaced by the CSR modules of :mod:`surgeon.formats.csr_layers`, every other weight dense.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.formats.common import (
    Options,
    Row,
    build_plain,
    damaged,
    dtype_name,
    masks_of,
    nbytes,
    target_kinds,
)
from surgeon.formats.csr_layers import (
    CSRConv1x1,
    CSRLinear,
    CSRRecurrent,
    csr_parts,
    from_parts,
    is_plain_1x1,
    is_plain_recurrent,
    to_csr,
)
from surgeon.formats.packed import dense_entries, header_fields, plain_state, write_model
from surgeon.io.bitpack import pack_mask
from surgeon.io.classes import copy_model
from surgeon.io.container import read_tensors
from surgeon.masking.surgery import fold

LAYOUT = "csr"
MAX_DENSITY = 0.5  # denser weights are never faster as CSR, so auto does not spend time measuring them
FASTER = 0.9  # auto converts a module when CSR takes at most this fraction of the dense time


def kind_of(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if is_plain_1x1(m):
        return "conv1x1"
    if is_plain_recurrent(m):
        return type(m).__name__.lower()
    return None


def sparse_weights(module: nn.Module, kind: str) -> list[str]:
    """The tensor names of ``module`` that a CSR module stores compressed."""
    if kind in ("gru", "lstm"):
        return [n for n, _ in module.named_parameters() if n.startswith("weight_ih_l")]
    return ["weight"]


def csr_module(module: nn.Module, kind: str, csr: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The CSR replacement of a dense ``module`` (``csr`` gives stored CSR weights by tensor name)."""
    csr = dict(csr or {})
    if kind in ("gru", "lstm"):
        return CSRRecurrent(module, csr)
    w = csr.get("weight")
    if w is None:
        w = to_csr(module.weight.reshape(module.weight.shape[0], -1))
    return (CSRLinear if kind == "linear" else CSRConv1x1)(w, module.bias)


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --- measuring ---------------------------------------------------------------------------------------------------


def _inputs_of(model: nn.Module, fqns: list[str], step: Callable[[nn.Module], Any]) -> dict[str, tuple]:
    """The positional inputs each module receives first in one ``step`` of the model."""
    seen: dict[str, tuple] = {}
    hooks = []
    for fqn in fqns:

        def hook(_m, args, fqn=fqn):
            seen.setdefault(fqn, tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))

        hooks.append(model.get_submodule(fqn).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            step(model)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _best_seconds(fns: dict[str, Callable[[], Any]], budget: float = 0.3, least: int = 5) -> dict[str, float]:
    """Fastest of interleaved repeats, about ``budget`` seconds each (at least ``least`` repeats, at most 25).

    Other processes only ever add time, so on a shared machine the fastest run is the steadiest estimate of what
    a module costs (the reasoning of ``timeit``); alternating the order lets neither side profit from position.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for i in range(25):
            for name, fn in list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            if i + 1 >= least and sum(sum(ts) for ts in times.values()) > budget * len(fns):
                break
    return {k: min(v) for k, v in times.items()}


def _density(module: nn.Module, names: list[str]) -> float:
    ws = [getattr(module, n) for n in names]
    return sum(int(torch.count_nonzero(w)) for w in ws) / max(1, sum(w.numel() for w in ws))


def choose(model: nn.Module, candidates: dict[str, str], opts: Options) -> dict[str, dict]:
    """``{module fqn: {"kind", "dense_ms", "csr_ms", "why"}}`` for every candidate; ``why`` is None if chosen."""
    decided: dict[str, dict] = {}
    if opts.layers == "all":
        return {fqn: {"kind": kind, "dense_ms": None, "csr_ms": None, "why": None} for fqn, kind in candidates.items()}
    sparse_enough = {
        f: k
        for f, k in candidates.items()
        if _density(model.get_submodule(f), sparse_weights(model.get_submodule(f), k)) <= MAX_DENSITY
    }
    for fqn, kind in candidates.items():
        if fqn not in sparse_enough:
            decided[fqn] = {"kind": kind, "dense_ms": None, "csr_ms": None, "why": f"denser than {MAX_DENSITY:g}"}
    if not sparse_enough:
        return decided
    if opts.example is None:
        raise SurgeonError(
            f"cannot measure which layers of {type(model).__name__} run faster as CSR: surgeon does "
            "not know its inputs",
            "pass --layers all, or surgeon.export(..., example=step_fn)",
        )
    inputs = _inputs_of(model, list(sparse_enough), opts.example)
    from surgeon.progress import WorkProgress

    with WorkProgress("measuring dense vs CSR", len(sparse_enough), enabled=opts.progress) as bar:
        for fqn, kind in sparse_enough.items():
            bar.advance()
            if fqn not in inputs:
                decided[fqn] = {"kind": kind, "dense_ms": None, "csr_ms": None, "why": "not run by the denoising step"}
                continue
            dense, args = model.get_submodule(fqn), inputs[fqn]
            sparse = csr_module(dense, kind)
            t = _best_seconds({"dense": partial(dense, *args), "csr": partial(sparse, *args)})
            faster = t["csr"] <= FASTER * t["dense"]
            decided[fqn] = {
                "kind": kind,
                "dense_ms": round(t["dense"] * 1e3, 4),
                "csr_ms": round(t["csr"] * 1e3, 4),
                "why": None if faster else "not faster as CSR",
            }
    return _confirm_whole_step(model, decided, opts.example)


def _confirm_whole_step(
    model: nn.Module, decided: dict[str, dict], step: Callable[[nn.Module], Any]
) -> dict[str, dict]:
    """Keep the per-layer choice only if the whole denoising step is faster with it, so auto is never slower.

    Layers measured faster alone can lose in the model (cache effects, threads, a busy machine during the
    per-layer timing); one interleaved whole-step comparison guards the result.
    """
    chosen = [f for f, d in decided.items() if d["why"] is None]
    if not chosen:
        return decided
    converted = copy_model(model)
    for fqn in chosen:
        _replace(converted, fqn, csr_module(converted.get_submodule(fqn), decided[fqn]["kind"]))
    # more repeats than per layer: one wrong call here throws away (or keeps) every layer's choice at once
    t = _best_seconds({"dense": lambda: step(model), "csr": lambda: step(converted)}, budget=4.0, least=9)
    if t["csr"] > FASTER * t["dense"]:
        why = f"whole step not faster with CSR ({t['csr'] * 1e3:.3g} vs {t['dense'] * 1e3:.3g} ms dense)"
        for fqn in chosen:
            decided[fqn]["why"] = why
    return decided


# --- writing -----------------------------------------------------------------------------------------------------


def write(model: nn.Module, out: Path, opts: Options) -> list[Row]:
    kinds, masks = target_kinds(model), masks_of(model)
    fold(model)
    model.float().eval()  # MKL's CSR kernels take fp32 only (the dtype was checked before)
    candidates = {fqn: k for fqn, m in model.named_modules() if (k := kind_of(m)) is not None}
    decided = choose(model, candidates, opts)
    chosen = {f: d for f, d in decided.items() if d["why"] is None}
    owner = {
        f"{mod}.{name}" if mod else name: mod
        for mod, d in chosen.items()
        for name in sparse_weights(model.get_submodule(mod), d["kind"])
    }
    module_of = {
        f"{mod}.{n}" if mod else n: mod
        for mod in candidates
        for n in sparse_weights(model.get_submodule(mod), candidates[mod])
    }

    tensors, rows = plain_state(model), []
    info: dict[str, dict[str, object]] = {}
    for fqn, (kind, shape) in kinds.items():
        w = tensors[fqn]
        if fqn in owner:
            parts = csr_parts(tensors.pop(fqn))
            info[fqn] = {
                "storage": "csr",
                "shape": list(shape),
                "dtype": dtype_name(w.dtype),
                "kind": kind,
                "module": owner[fqn],
            }
            storage, runs = "csr", "csr"
        elif fqn in masks:
            tensors.pop(fqn)
            parts = {"values": w[masks[fqn]], "mask": pack_mask(masks[fqn])}
            info[fqn] = {
                "storage": "values+mask",
                "shape": list(shape),
                "dtype": dtype_name(w.dtype),
                "kind": kind,
                "kept": int(parts["values"].numel()),
                "nm": None,
                "lambda_w": None,
            }
            storage, runs = "values+mask", "dense"
        else:
            parts, storage, runs = {}, "dense", "dense"
        for part, t in parts.items():
            tensors[f"{fqn}.{part}"] = t
        d = decided.get(module_of.get(fqn, ""), {})
        note = d.get("why") or ""
        if d.get("dense_ms") is not None:
            note = f"{note + '; ' if note else ''}dense {d['dense_ms']:.3g} ms, csr {d['csr_ms']:.3g} ms"
        elif fqn not in module_of:
            note = (
                "recurrent weights run dense, step by step" if ".weight_hh_l" in fqn else "no CSR module for this layer"
            )
        rows.append(Row(fqn, kind, shape, storage, nbytes(*(parts.values() or [w])), runs, note))
    fields = header_fields(model, {}, opts.recipe, opts.extra)
    write_model(model, out, tensors, LAYOUT, {**fields, "tensors": info, "csr": chosen}, opts.force)
    return rows


# --- reading -----------------------------------------------------------------------------------------------------


def read(meta: Mapping, device: torch.device | str | None = None) -> nn.Module:
    if device is not None and torch.device(device).type != "cpu":
        raise SurgeonError(
            f"{meta['file']} computes with CPU CSR kernels", "load it on the CPU, or export another format"
        )
    tensors = read_tensors(meta["file"])
    stored: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, info in meta["tensors"].items():
        if info.get("storage") != "csr":
            continue
        crow, col, values = (tensors.pop(f"{fqn}.{p}", None) for p in ("crow", "col", "values"))
        shape = tuple(info.get("shape") or ())
        if crow is None or col is None or values is None or len(shape) < 2:
            raise damaged(meta, f"{fqn} lacks its .crow, .col or .values tensor")
        try:
            w = from_parts(crow, col, values, (shape[0], torch.Size(shape[1:]).numel()))
        except RuntimeError as e:
            raise damaged(meta, f"{fqn} is not a valid CSR matrix") from e
        tensors[fqn] = w.to_dense().reshape(shape)  # the plain model is built dense first, then swapped
        module, _, name = fqn.rpartition(".")
        stored.setdefault(module, {})[name] = w
    model = build_plain(meta, dense_entries(meta, tensors))
    csr = meta.get("csr") or {}
    for fqn, d in csr.items():
        module = model.get_submodule(fqn)
        if kind_of(module) != d.get("kind"):
            raise damaged(meta, f"module {fqn} is a {type(module).__name__}, the file converted a {d.get('kind')}")
        _replace(model, fqn, csr_module(module, d["kind"], stored.get(fqn)).eval())
    return model
