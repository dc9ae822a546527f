"""``semi-structured``: 2:4 weights as NVIDIA's sparse tensor cores take them (``docs/formats.md``, "Semi-structured").

Every target weight that is 2:4 along its reduction dimension (at most 2 nonzeros in every group of 4, grouped as
:func:`surgeon.sparsity.patterns.nm_groups` does: ``in`` for Linear/RNN, NHWC order for convs) is stored as
``P.values`` (``[rows, cols / 2]``: the kept half, 2 per group, in group order) and ``P.meta`` (``uint8 [rows,
ceil(cols / 8)]``: each kept value's 2-bit position in its group, ascending within the group, 4 positions per byte,
the first in the low bits). Masked tensors that cannot be 2:4 (reduction size not a multiple of 4) are stored as
in ``packed``; every other tensor as it is.

Loading on CPU gives plain dense weights (outputs identical to the masked model). Loading on CUDA swaps every 2:4
Linear weight, and every 1×1 convolution through a channel matmul, for torch's semi-structured sparse tensor
(cuSPARSELt or CUTLASS), so those layers run the 2:4 kernels; other layers stay dense.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from surgeon.errors import SurgeonError, brief
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
from surgeon.formats.packed import dense_entries, header_fields, plain_state, write_model
from surgeon.io.bitpack import pack_mask
from surgeon.io.container import read_tensors
from surgeon.masking.surgery import remove
from surgeon.sparsity.patterns import nm_groups, nm_mask, nm_skip_reason, nm_ungroup

LAYOUT = "semi-structured"
NOT_24_HINT = "fine-tune it to 2:4 first (surgeon finetune --nm 2:4), or pass --prune for one-shot magnitude 2:4"
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


# --- the encoding ------------------------------------------------------------------------------------------------


def is_24(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 along the reduction dimension."""
    return bool((torch.count_nonzero(nm_groups(w != 0, 4), dim=1) <= 2).all())


def compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 tensor → (kept values ``[rows, cols/2]``, 2-bit positions ``uint8 [rows, ceil(cols/8)]``)."""
    rows = w.shape[0]
    groups = nm_groups(w, 4)  # [G, 4]
    # the nonzeros of each group, then (for groups with fewer than 2) the lowest free positions: ascending pairs
    score = (groups != 0).float() * 4 + torch.arange(3, -1, -1, dtype=torch.float32)
    pos = score.topk(2, dim=1).indices.sort(dim=1).values  # [G, 2]
    values = groups.gather(1, pos).reshape(rows, -1)
    pos = pos.to(torch.uint8).reshape(rows, -1)
    pos = F.pad(pos, (0, -pos.shape[1] % 4)).reshape(rows, -1, 4)
    meta = (pos << _SHIFTS).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is the bitwise or
    return values.contiguous(), meta.contiguous()


def decompress(values: torch.Tensor, meta: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`compress`: the dense tensor of ``shape``, zeros at the pruned positions."""
    rows, half = values.shape
    pos = ((meta[..., None] >> _SHIFTS) & 3).reshape(rows, -1)[:, :half].reshape(-1, 2).long()
    if not bool((pos[:, 0] < pos[:, 1]).all()):
        raise ValueError("positions within a group must be distinct and ascending")
    groups = torch.zeros(pos.shape[0], 4, dtype=values.dtype).scatter_(1, pos, values.reshape(-1, 2))
    return nm_ungroup(groups, shape)


# --- writing -----------------------------------------------------------------------------------------------------


def write(model: nn.Module, out: Path, opts: Options) -> list[Row]:
    kinds, masks = target_kinds(model), masks_of(model)
    remove(model)  # the stored weights, then each mask applied as taken above: an N:M mask is computed once
    storage, notes, not_24, pruned = {}, {}, [], []
    with torch.no_grad():
        for fqn, mask in masks.items():
            model.get_parameter(fqn).mul_(mask.to(model.get_parameter(fqn).device))
        for fqn, (_, shape) in kinds.items():
            w = model.get_parameter(fqn)
            reason = nm_skip_reason(shape, 4)
            if reason:
                storage[fqn], notes[fqn] = ("values+mask" if fqn in masks else "dense"), reason
            elif is_24(w):
                storage[fqn] = "2:4"
            elif opts.prune:
                w.mul_(nm_mask(w, 2, 4))
                storage[fqn], notes[fqn] = "2:4", "pruned to 2:4 by magnitude"
                pruned.append(fqn)
            elif fqn in masks:
                not_24.append(fqn)
            else:
                storage[fqn], notes[fqn] = "dense", "not 2:4 (not sparsified)"
    if not_24:
        raise SurgeonError(
            f"the model is not 2:4: {len(not_24)} masked tensors break the pattern (e.g. {not_24[0]})", NOT_24_HINT
        )
    if "2:4" not in storage.values():
        raise SurgeonError("the model has no 2:4 weights to export", NOT_24_HINT)
    if pruned:
        warnings.warn(
            f"pruned {len(pruned)} tensors to 2:4 by magnitude, without fine-tuning: expect worse samples "
            "(surgeon finetune --nm 2:4 recovers them)",
            stacklevel=3,
        )

    tensors, info, rows = plain_state(model, opts.dtype), {}, []
    for fqn, (kind, shape) in kinds.items():
        how = storage[fqn]
        w = tensors.pop(fqn) if how != "dense" else tensors[fqn]
        entry: dict[str, object] = {"storage": how, "shape": list(shape), "dtype": dtype_name(w.dtype), "kind": kind}
        if how == "2:4":
            parts = dict(zip(("values", "meta"), compress(w)))
            runs = "2:4 (CUDA)" if kind == "linear" or _is_1x1(shape) else "dense"
        elif how == "values+mask":
            parts = {"values": w[masks[fqn]], "mask": pack_mask(masks[fqn])}
            entry.update(kept=int(parts["values"].numel()), nm=None, lambda_w=None)
            runs = "dense"
        else:
            parts, runs = {}, "dense"
        for part, t in parts.items():
            tensors[f"{fqn}.{part}"] = t
        if how != "dense":
            info[fqn] = entry
        stored = list(parts.values()) or [w]
        rows.append(Row(fqn, kind, shape, how, nbytes(*stored), runs, notes.get(fqn, "")))
    fields = header_fields(model, {}, opts.recipe, opts.extra)
    write_model(model, out, tensors, LAYOUT, {**fields, "tensors": info}, opts.force)
    return rows


def _is_1x1(shape) -> bool:
    return len(shape) > 2 and all(k == 1 for k in shape[2:])


# --- reading -----------------------------------------------------------------------------------------------------


def read(meta: Mapping, device: torch.device | str | None = None) -> nn.Module:
    tensors = read_tensors(meta["file"])
    for fqn, info in meta["tensors"].items():
        if info.get("storage") != "2:4":
            continue
        values, positions = tensors.pop(f"{fqn}.values", None), tensors.pop(f"{fqn}.meta", None)
        shape = tuple(info.get("shape") or ())
        if values is None or positions is None or len(shape) < 2:
            raise damaged(meta, f"{fqn} lacks its .values or .meta tensor")
        cols = values.shape[1] * 2 if values.dim() == 2 else -1
        if (
            cols * shape[0] != torch.Size(shape).numel()
            or positions.dtype != torch.uint8
            or tuple(positions.shape) != (shape[0], -(-cols // 8))
        ):
            raise damaged(
                meta,
                f"{fqn} has values {list(values.shape)} and positions {list(positions.shape)} "
                f"that do not fit {list(shape)}",
            )
        try:
            tensors[fqn] = decompress(values, positions, shape)
        except ValueError as e:
            raise damaged(meta, f"{fqn}: {e}") from e
    model = build_plain(meta, dense_entries(meta, tensors))
    if device is None:
        return model
    model.to(device)
    if torch.device(device).type == "cuda":
        swap_to_semi_structured(model, [f for f, i in meta["tensors"].items() if i.get("storage") == "2:4"])
    return model


class ChannelLinear(nn.Module):
    """A 1×1 convolution computed as a matmul over channels, so a semi-structured weight can run it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.movedim(1, -1)
        y = F.linear(channels_last.reshape(-1, channels_last.shape[-1]), self.weight, self.bias)
        return y.reshape(*channels_last.shape[:-1], -1).movedim(-1, 1)


def swap_to_semi_structured(model: nn.Module, fqns: list[str]) -> dict[str, str]:
    """Give every eligible 2:4 weight torch's semi-structured tensor (CUDA); returns ``{fqn: why it stays dense}``."""
    from torch.sparse import to_sparse_semi_structured

    dense = {}
    for fqn in fqns:
        module_name, _, name = fqn.rpartition(".")
        module = model.get_submodule(module_name)
        conv_1x1 = (
            isinstance(module, (nn.Conv1d, nn.Conv2d))
            and _is_1x1(module.weight.shape)
            and all(s == 1 for s in module.stride)
            and all(p == 0 for p in module.padding)
            and module.groups == 1
            and module.padding_mode == "zeros"
        )
        if name != "weight" or not (isinstance(module, nn.Linear) or conv_1x1):
            dense[fqn] = "no 2:4 kernel for this layer"
            continue
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        try:
            sparse = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError, TypeError) as e:  # shape or dtype the kernels do not take
            dense[fqn] = brief(e)
            continue
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(sparse, requires_grad=False)
        else:
            parent = model.get_submodule(module_name.rpartition(".")[0]) if "." in module_name else model
            setattr(parent, module_name.rpartition(".")[2], ChannelLinear(sparse, module.bias))
    return dense
