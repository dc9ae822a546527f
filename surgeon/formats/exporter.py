"""``surgeon.export``: turn a (sparse) model into a deployable artifact in one of the formats of :mod:`surgeon.formats`.

The model is resolved (any reference :func:`surgeon.load_model` takes, or a module), the request is checked before
anything is written. The input is never changed: a writer that only reads the model (dense, packed) gets the
caller's module itself, one that folds, casts or swaps modules (semi-structured, csr) a deep copy of it; a model
loaded here for the export is the writer's own, uncopied.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from surgeon.errors import SurgeonError, UsageError, check_arg, check_path
from surgeon.formats import FORMATS, packed
from surgeon.formats.common import Options, Row, dtype_name, parse_dtype
from surgeon.formats.dense import denoiser_part
from surgeon.formats.inputs import denoising_step
from surgeon.formats.loading import load_model
from surgeon.io.atomic import check_apart, check_output
from surgeon.io.classes import copy_model
from surgeon.io.container import read_metadata
from surgeon.io.lock import exclusive


@dataclass
class Exported:
    format: str
    out: Path
    rows: list[Row]
    file_bytes: int  # everything written under ``out``
    warnings: list[str] = field(default_factory=list)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source_metadata(ref: Path) -> dict | None:
    try:
        return read_metadata(ref)
    except SurgeonError:
        return None  # not a surgeon file: a diffusers folder, a preset, ...


def export(
    model: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    format: str = "dense",  # noqa: A002 - the CLI's --format
    dtype: str | None = None,
    force: bool = False,
    pipeline: bool | str | os.PathLike = False,
    prune: bool = False,
    layers: str = "auto",
    example: Callable[[nn.Module], Any] | None = None,
    progress: bool = True,
    trust_code: bool = False,
) -> Exported:
    """Write ``model`` to ``out`` in ``format`` (dense, packed, semi-structured, csr; see docs/formats.md).

    dtype: fp32, fp16 or bf16 (the format must hold it). pipeline (dense): write the latent pipeline the model
    came from (True: the one its metadata names) around it. prune (semi-structured): one-shot magnitude 2:4 where a
    weight is not 2:4 yet. layers (csr): "auto" measures each layer on ``example`` (one denoising step; by default
    built from the model's config) and converts it only where CSR is faster; "all" converts every eligible layer.
    trust_code: as in :func:`surgeon.load_model`, for a model folder that records a class from a file or module.
    """
    check_arg(model, (nn.Module, str, os.PathLike), "model", "a torch.nn.Module or a model reference (a path or name)")
    check_path(out, "out")
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}", f"choose one of: {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None and dtype_name(torch_dtype) not in [dtype_name(parse_dtype(d)) for d in fmt.dtypes]:
        raise SurgeonError(
            f"the {format} format cannot hold {dtype}: it stores {', '.join(fmt.dtypes)}",
            "drop --dtype, or export half precision as dense, packed or semi-structured",
        )
    if layers not in ("auto", "all"):
        raise UsageError(f"unknown --layers {layers!r}", "choose auto (measured per layer) or all")
    for flag, given, allowed in (
        ("--pipeline", bool(pipeline), "dense"),
        ("--prune", prune, "semi-structured"),
        ("--layers all", layers == "all", "csr"),
    ):
        if given and format != allowed:
            raise UsageError(f"{flag} is for --format {allowed}, not {format}", f"drop {flag}")
    out = Path(out)
    meta = None
    callers = isinstance(model, nn.Module)
    if not callers:
        source = Path(model).expanduser()
        check_apart(out, "model", source)
        meta = _source_metadata(source) if source.exists() else None
        pipeline_of_ref = source if (source / "model_index.json").is_file() else None
        if format == "dense" and meta is not None and meta["layout"] == packed.LAYOUT:
            # folded as it loads: the 1-byte masks of all layers (0.7 GB at DiT-XL size) are never held at once
            model = packed.load(meta["file"], trust_code=trust_code, folded=True)
        else:
            model = load_model(model, trust_code=trust_code)
    else:
        pipeline_of_ref = None
    extra = dict(meta["extra"]) if meta else {}
    if pipeline is True:
        pipeline = extra.get("pipeline") or pipeline_of_ref
        if not pipeline:
            raise SurgeonError(
                "--pipeline: the model's metadata names no pipeline",
                "export a model trained from a latent pipeline folder, or pass pipeline=PATH",
            )
    if pipeline:
        pipeline = Path(pipeline)
        denoiser_part(pipeline)  # refuses a folder that is not a pipeline, before any work
        check_apart(out, "pipeline", pipeline)
    check_output(out, force)
    with exclusive(out):  # one writer per output
        check_output(out, force)  # again, now that no other writer can change it
        if format == "csr" and layers == "auto" and example is None:
            example = denoising_step(model)
        opts = Options(
            dtype=torch_dtype,
            force=force,
            pipeline=str(pipeline) if pipeline else None,
            prune=prune,
            layers=layers,
            example=example,
            progress=progress,
            recipe=meta["recipe"] if meta else None,
            extra=extra,
            owned=not callers,
        )
        # writers that change the model never work on the caller's; one loaded here is no one else's
        work = copy_model(model) if callers and fmt.changes_model else model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = fmt.write(work, out, opts)
        notes = [str(w.message) for w in caught]
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return Exported(format, out, rows, _size(out), notes)
