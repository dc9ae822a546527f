"""Export formats, one module each, and the one table of them (``docs/formats.md``, "Export formats").

Every format has a ``write(model, out, options) -> rows`` (those that fold, cast or swap modules take a private
copy of a caller's model; dense and packed only read it), and a
``read(meta, device) -> model`` for the surgeon files it writes; :func:`load` reads any surgeon file or folder by
the layout recorded in its metadata, never by its name. ``surgeon.export(...)`` (in :mod:`surgeon.exporting`)
resolves the model, checks the request and calls the writer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError, check_path
from surgeon.formats import csr, dense, packed, semi_structured
from surgeon.formats.common import DTYPES, Options, Row, nbytes, target_kinds
from surgeon.io.classes import trusting_code
from surgeon.io.container import read_metadata, read_tensors, verify_integrity
from surgeon.masking.surgery import sites


@dataclass(frozen=True)
class Format:
    name: str
    layout: str  # what read_metadata reports for its files
    dtypes: tuple[str, ...]  # the --dtype values it can hold
    write: Callable[[nn.Module, Path, Options], list[Row]]
    read: Callable[[Mapping, torch.device | str | None], nn.Module]
    about: str
    changes_model: bool = False  # the writer folds, casts or swaps modules: it gets a copy of a caller's module


def _write_packed(model: nn.Module, out: Path, opts: Options) -> list[Row]:
    """surgeon's own format (kept values + 1-bit masks), optionally cast; it loads back masked, ready to train."""
    kinds, masked = target_kinds(model), sites(model)
    tensors, info = packed.encode(model, opts.dtype)
    fields = packed.header_fields(model, info, opts.recipe, opts.extra)
    packed.write_model(model, out, tensors, packed.LAYOUT, fields, opts.force)
    rows = []
    for fqn, (kind, shape) in kinds.items():
        if fqn in masked:
            rows.append(
                Row(
                    fqn,
                    kind,
                    shape,
                    "values+mask",
                    nbytes(tensors[f"{fqn}.values"], tensors[f"{fqn}.mask"]),
                    "dense (masked)",
                )
            )
        else:
            rows.append(Row(fqn, kind, shape, "dense", nbytes(tensors[fqn]), "dense"))
    return rows


def _read_packed(meta: Mapping, device: torch.device | str | None = None) -> nn.Module:
    tensors = read_tensors(meta["file"])
    packed.check_tensor_info(meta)
    model = packed.restore(packed.build(meta, tensors, empty=True), meta, tensors)
    return model.to(device) if device is not None else model


FORMATS = {
    f.name: f
    for f in (
        Format(
            "dense",
            dense.LAYOUT,
            tuple(DTYPES),
            dense.write,
            dense.read,
            "plain weights, masks folded in: diffusers folders, pipeline folders or one .safetensors file",
        ),
        Format(
            "packed",
            packed.LAYOUT,
            tuple(DTYPES),
            _write_packed,
            _read_packed,
            "kept values + 1-bit masks; loads back masked, ready to train on",
        ),
        Format(
            "semi-structured",
            semi_structured.LAYOUT,
            tuple(DTYPES),
            semi_structured.write,
            semi_structured.read,
            "2:4 weights as half the values + 2-bit positions; CUDA runs them on sparse tensor cores",
            changes_model=True,
        ),
        Format(
            "csr",
            csr.LAYOUT,
            ("fp32",),
            csr.write,
            csr.read,
            "compressed sparse rows where measured faster on CPU (fp32)",
            changes_model=True,
        ),
    )
}


def load(path: str | os.PathLike, device: torch.device | str | None = None, trust_code: bool = False) -> nn.Module:
    """Any model surgeon wrote (a folder or one ``.safetensors`` file, every format), by its recorded layout.

    ``device``: where the model goes; ``"cuda"`` also turns on the 2:4 kernels of a semi-structured file.
    ``trust_code``: a recorded class outside diffusers and surgeon's own models (a ``file.py:Class`` or another
    module) is refused unless ``trust_code=True``: importing it would run its code.
    """
    check_path(path, "path")
    meta = read_metadata(path)
    for fmt in FORMATS.values():
        if fmt.layout == meta["layout"]:
            with trusting_code(trust_code):
                model = fmt.read(meta, device)
            verify_integrity(meta)  # last: a format's own checks name what they find first
            return model
    raise SurgeonError(
        f"{meta['file']} holds the {meta['layout']!r} layout, which this surgeon cannot read", "upgrade surgeon"
    )


__all__ = ["FORMATS", "Format", "Options", "Row", "load"]
