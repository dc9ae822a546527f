"""N:M effective weights are recomputed in backward instead of being kept from forward.

A conv or linear saves its weight for backward (dL/dx needs it). Dense training saves the parameter itself; an N:M
layer's weight is S(W), a new tensor each forward, so keeping it would hold a second copy of every masked weight
from forward to backward. Around each forward of a module with an N:M parametrization (a forward pre-hook and an
always-called forward hook, registered by inject), :func:`recomputing` installs saved-tensors hooks whose pack hook
recognises an effective weight NMMask made (or a view of one: linear saves ``weight.t()``) and stores (W, N, M)
instead; unpack recomputes S(W) from W, which nothing changes between forward and backward (checked: W's version
counter; FSDP2 refills a gathered W without bumping it). The recomputed tensor is bit for bit the one forward used,
so gradients are unchanged. Layers under ``RECOMPUTED_FROM`` weights keep their S(W): memory is not what they
cost. Recomputing costs one more pass of the kernel per layer and step; storing the mask
instead would hold 1/32 of W (bits) or 1/4 (bytes) from forward to backward and still cost a pass to expand.

Every other saved tensor goes to the hooks that were in force outside (a user's saved_tensors_hooks, non-reentrant
checkpointing's), or is kept as it is, with the version check autograd makes on tensors it keeps itself. Forwards
without grad install nothing. Under checkpointing the recomputed forward runs the same hooks, so the tensors it
hands checkpoint are the same ones, in the same order.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from surgeon.errors import SurgeonError
from surgeon.sparsity.patterns import nm_apply
from surgeon.sparsity.scratch import recycled

# (device, storage address) of an effective weight -> (weakref to it, its version, W, n, m); an entry goes when its
# tensor does. Keyed by storage, not by tensor: what an op saves is often a view (linear: weight.t()), and a view's
# _base is the root of its storage (here the recycled block), not the effective weight.
_SOURCES: dict[tuple[torch.device, int], tuple[weakref.ref, int, torch.Tensor, int, int]] = {}
_local = threading.local()  # the open hooks of the module forwards running on this thread (innermost last)
# a smaller S(W) is saved as it is: its second kernel pass is mostly per-op overhead at that size (a 0.69M-parameter
# UNet's 2:4 step: 1.31x dense recomputing every layer, 1.22x saving them), while what it holds is at most 256 KiB
RECOMPUTED_FROM = 1 << 16


def effective_weight(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """S(W) for a forward: in a recycled block inside a hooked forward (it is dropped as soon as the forward ends,
    the saved copy being W), recorded so that the pack hook knows it."""
    opened = getattr(_local, "open", None)
    inside = bool(opened) and opened[-1][1] is not None and w.numel() >= RECOMPUTED_FROM
    out = nm_apply(w, n, m, out=recycled("nm.effective", w.shape, w.dtype, w.device) if inside else None)
    if inside:
        key = (out.device, out.untyped_storage().data_ptr())
        _SOURCES[key] = (weakref.ref(out, _forget(key)), out._version, w, n, m)
    return out


def _forget(key: tuple[torch.device, int]) -> Callable[[weakref.ref], None]:
    def forget(_: weakref.ref) -> None:
        _SOURCES.pop(key, None)

    return forget


class _Recompute:
    """What is saved in place of an effective weight (or a view of one): S(W) is made again at unpack."""

    __slots__ = ("w", "n", "m", "version", "view")

    def __init__(self, t: torch.Tensor, effective: torch.Tensor, w: torch.Tensor, n: int, m: int):
        self.w, self.n, self.m, self.version = w, n, m, w._version
        offset = t.storage_offset() - effective.storage_offset()
        self.view = None if t is effective else (t.size(), t.stride(), offset)

    def unpack(self) -> torch.Tensor:
        if self.w._version != self.version:
            raise SurgeonError(
                "an N:M layer's weight was modified in place between its forward and backward",
                "change weights only after backward (the optimizer step), or run the forward again",
            )
        out = nm_apply(self.w, self.n, self.m, out=recycled("nm.effective", self.w.shape, self.w.dtype, self.w.device))
        if self.view is None:
            return out
        size, stride, offset = self.view
        return out.as_strided(size, stride, out.storage_offset() + offset)


class _Kept:
    """A saved tensor kept as it is, with autograd's own check that nothing changed it in place meanwhile."""

    __slots__ = ("t", "version")

    def __init__(self, t: torch.Tensor):
        self.t, self.version = t, t._version

    def unpack(self) -> torch.Tensor:
        if self.t._version != self.version:
            raise SurgeonError(
                "a tensor saved for backward inside an N:M-masked module was modified in place "
                f"(version {self.version}, now {self.t._version})",
                "clone it before changing it in place, as autograd requires",
            )
        return self.t


class _Outer:
    __slots__ = ("packed", "unpack_hook")

    def __init__(self, packed: Any, unpack_hook: Callable[[Any], torch.Tensor]):
        self.packed, self.unpack_hook = packed, unpack_hook

    def unpack(self) -> torch.Tensor:
        return self.unpack_hook(self.packed)


def _source(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(the effective weight, W, n, m) when ``t`` is an effective weight or a view of one, unchanged since made."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return None  # a subclass (a DTensor) has no storage of its own to look up
    entry = _SOURCES.get((t.device, t.untyped_storage().data_ptr()))
    if entry is None:
        return None
    effective = entry[0]()
    if effective is None or effective._version != entry[1] or effective.dtype != t.dtype:
        return None  # changed in place after S(W) made it: what is saved is no longer S(W)
    return effective, entry[2], entry[3], entry[4]


def _hooks() -> saved_tensors_hooks:
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def pack(t: torch.Tensor) -> Any:
        found = _source(t)
        if found is not None:
            return _Recompute(t, *found)
        return _Kept(t) if outer is None else _Outer(outer[0](t), outer[1])

    return saved_tensors_hooks(pack, _unpack)


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack()


def recomputing(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook of a module with an N:M parametrization: saved effective weights are recomputed."""
    hooks = None
    if torch.is_grad_enabled() and torch._C._autograd._saved_tensors_hooks_is_enabled():
        hooks = _hooks()
        hooks.__enter__()
    _local.__dict__.setdefault("open", []).append((module, hooks))


def recomputed(module: torch.nn.Module, args: Any, output: Any) -> None:
    """Its forward hook (always called, so an exception in forward cannot leave the hooks installed)."""
    opened = getattr(_local, "open", None)
    if not opened or opened[-1][0] is not module:
        return  # registered while this forward was running: its pre-hook did not run
    _, hooks = opened.pop()
    if hooks is not None:
        hooks.__exit__()
