"""Whole tensors and local shards of an FSDP2-sharded model (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps every parameter as a DTensor sharded on dim 0 and gathers it only around the forward and backward of
its module. Everything surgeon does with weights outside those passes (mask updates, optimizer-state and EMA
resets, counts, saving) works on whole tensors: it gathers a shard with :func:`full` and writes a whole tensor back
into one with :func:`like`, which keeps the local part only. Masks are plain buffers, which FSDP2 does not shard:
every rank holds the whole mask (docs/methods.md, "Invariants"; the README says why). On an unsharded model each function returns
its tensor unchanged, so the same code serves both.

:func:`full` is a collective: every rank must call it, in the same order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _loaded(module: str, name: str):
    """A class of torch.distributed, when something imported it already: nothing can be an instance otherwise, and
    importing it costs every command over a second."""
    return getattr(sys.modules.get(module), name, None)


def is_sharded(t: torch.Tensor) -> bool:
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(t, dtensor)


def model_is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model`` (a forward without backward can leave some of its parameters gathered)."""
    fsdp = _loaded("torch.distributed.fsdp", "FSDPModule")
    return fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank; a collective) of a shard, else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (no communication), else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def like(whole: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same on every rank) laid out as ``ref`` is: sharded as ``ref`` when it is a shard, keeping only
    this rank's part (no communication), else ``whole`` on ``ref``'s device."""
    if not is_sharded(ref):
        return whole.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(ref.to_local().device)
    return distribute_tensor(whole, ref.device_mesh, ref.placements, src_data_rank=None)


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` is as one process would hold it: every sharded parameter a plain whole tensor on
    the CPU (gathered on every rank: a collective) and every module of its own class again (FSDP2 gives each
    sharded module a generated ``FSDP<Class>``, which a saved config would name). All comes back on exit.
    Not for forward passes: FSDP2 puts its own tensors back around each one.
    """
    from torch.distributed.fsdp import FSDPModule

    classes, swapped = [], []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # a forward without backward leaves the root's own parameters gathered
            classes.append((module, type(module)))
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and is_sharded(p):
                    swapped.append((module, name, p))
                    module._parameters[name] = nn.Parameter(p.full_tensor().cpu(), requires_grad=p.requires_grad)
    for module, cls in classes:
        module.__class__ = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        for module, cls in classes:
            module.__class__ = cls
        for module, name, p in swapped:
            module._parameters[name] = p
