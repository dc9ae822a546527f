"""Reused per-thread buffers for the temporaries of mask arithmetic, and bool flags widened to integer words.

A fresh CPU tensor of more than 32 MiB is mapped anew by malloc and pays a page fault per 4 KiB on first touch:
about 2 ns per float32 element at one thread, as much as the arithmetic on it. The temporaries of a mask update or
a gradient's masking live for one call, so each (slot, device, dtype) keeps one buffer, grown when a larger
tensor needs it. Its contents are garbage on return and valid until the same thread asks for the same slot again.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_local = threading.local()  # the backward runs gradient hooks on its own thread


def buffer(slot: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` and ``dtype`` in this thread's buffer ``slot``."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (slot, torch.device(device), dtype)
    numel = math.prod(int(size) for size in shape)
    held = buffers.get(key)
    if held is None or held.numel() < numel:
        held = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return held[:numel].view(shape)


def widened(flags: torch.Tensor, width: torch.dtype, where: bool, slot: str = "words") -> torch.Tensor:
    """``flags`` as integer words of ``width`` (a buffer): all bits set where ``flags`` equals ``where``, none
    elsewhere. ANDing a tensor's bits with it keeps those entries and sets the others to +0.0 (or integer 0).

    The default slot is read-only for callers and remembers what it holds: the same unchanged ``flags`` asked for
    again (AdamW's two moments and the EMA zeroed at one update's positions) reuse the words."""
    made = _local.__dict__.setdefault("widened", {})
    key = (width, where, flags.shape, flags.device)
    if slot == "words":
        held = made.get(slot)
        if held is not None and held[0]() is flags and held[1] == (flags._version, key):
            return held[2]
    out = buffer(slot, flags.shape, width, flags.device).copy_(flags)  # True -> 1
    out = out.neg_() if where else out.sub_(1)  # 1 -> -1 (all bits set), or 0 -> -1
    if slot == "words":
        made[slot] = (weakref.ref(flags), (flags._version, key), out)
    return out


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # FSDP2 asks the same; absent: every block is fresh
_HELD_BLOCKS = 4  # per slot: one in flight is the rule (a layer's effective weight); more when a caller keeps one


def recycled(slot: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` that may be handed out and outlive the call, in one of this thread's
    blocks for ``slot`` that no tensor references any more (else in a new block).

    For results that live briefly and are made again and again (an N:M layer's effective weight, every forward
    and backward): a fresh one of more than 32 MiB would pay its page faults each time. A block is free when its
    storage has no user but the pool's own tensor (any view, alias or ``set_`` of a handed-out tensor holds it),
    so a result the caller keeps is never written over; it only makes the pool take another block.
    """
    numel = math.prod(int(size) for size in shape)
    if _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = _local.__dict__.setdefault("recycled", {}).setdefault((slot, torch.device(device), dtype), [])
    free = [i for i, (block, alone) in enumerate(pool) if _use_count(block.untyped_storage()._cdata) == alone]
    fits = [i for i in free if pool[i][0].numel() >= numel]
    if fits:
        block = pool[min(fits, key=lambda i: pool[i][0].numel())][0]
    else:
        # the free blocks are too small for this size, which a new block serves as well as theirs; blocks still in
        # use beyond the few held are let go (freed as usual once their users drop them)
        pool[:] = [entry for i, entry in enumerate(pool) if i not in free][-(_HELD_BLOCKS - 1) :]
        block = torch.empty(numel, dtype=dtype, device=device)
        pool.append((block, _use_count(block.untyped_storage()._cdata)))
    return block[:numel].view(shape)
