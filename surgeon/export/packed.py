"""``packed``: surgeon's own format (kept values + 1-bit masks, ``docs/formats.md``), optionally cast to ``--dtype``.

Loading it gives the masked model back, parametrizations included, so it can be trained further.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .. import packed
from ..container import read_tensors
from ..surgery import sites
from .common import Options, Row, nbytes, target_kinds

LAYOUT = packed.LAYOUT


def write(model: nn.Module, out: Path, opts: Options) -> list[Row]:
    kinds, masked = target_kinds(model), sites(model)
    tensors, info = packed.encode(model, opts.dtype)
    fields = packed.header_fields(model, info, opts.recipe, opts.extra)
    packed.write_model(model, out, tensors, LAYOUT, fields, opts.force)
    rows = []
    for fqn, (kind, shape) in kinds.items():
        if fqn in masked:
            rows.append(Row(fqn, kind, shape, "values+mask", nbytes(tensors[f"{fqn}.values"], tensors[f"{fqn}.mask"]),
                            "dense (masked)"))
        else:
            rows.append(Row(fqn, kind, shape, "dense", nbytes(tensors[fqn]), "dense"))
    return rows


def read(meta: Mapping, device: torch.device | str | None = None) -> nn.Module:
    tensors = read_tensors(meta["file"])
    packed.check_tensor_info(meta)
    model = packed.restore(packed.build(meta, tensors), meta, tensors)
    return model.to(device) if device is not None else model
