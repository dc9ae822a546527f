"""Mask bit packing: a bool tensor as 1 bit per element, laid out as ``numpy.packbits(..., bitorder="little")``.

The layout (``docs/formats.md``, "Packed masks"): the tensor is viewed as ``[shape[0], -1]`` and each row is packed
on its own, element ``8j + i`` of a row being bit ``i`` of byte ``j``; rows are padded with zero bits to whole bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# numpy's packbits/unpackbits are this layout (rows on their own, little bit order) and run at about 0.1 ns per
# mask element on a CPU at one thread, several times faster than the same packing in torch tensor arithmetic.


def rows_cols(shape) -> tuple[int, int]:
    """``shape`` viewed as ``[shape[0], -1]``."""
    rows = int(shape[0]) if len(shape) else 1
    return rows, math.prod(shape) // rows if rows else 0


def packed_shape(shape) -> tuple[int, int]:
    """The shape :func:`pack_mask` gives a mask of ``shape``."""
    rows, cols = rows_cols(shape)
    return rows, -(-cols // 8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``shape`` → uint8 ``[shape[0], ceil(cols / 8)]``; element 8j+i of a row is bit i of byte j."""
    rows, cols = rows_cols(mask.shape)
    bits = mask.detach().to("cpu", torch.bool).contiguous().view(torch.uint8).reshape(rows, cols).numpy()
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: a bool tensor of ``shape`` (a new one, nobody else's)."""
    rows, cols = rows_cols(shape)
    packed = packed.detach().to("cpu", torch.uint8).contiguous().reshape(packed_shape(shape))
    bits = np.unpackbits(packed.numpy(), axis=1, count=cols, bitorder="little")  # one 0/1 byte per element
    return torch.from_numpy(bits).view(torch.bool).reshape(tuple(shape))


def kept_values(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t[mask]`` (1-D, on CPU), by numpy's boolean indexing: about twice as fast as torch's on a CPU at one thread
    (5 vs 11 ns per element on a 14.7M-weight layer). Dtypes numpy lacks (bfloat16) are moved as integers of their width."""
    t, mask = t.detach().to("cpu").contiguous(), mask.detach().to("cpu", torch.bool).contiguous()
    if t.is_complex() or t.element_size() not in _SAME_WIDTH:
        return t[mask]
    picked = t.view(_SAME_WIDTH[t.element_size()]).numpy()[mask.numpy()]
    return torch.from_numpy(picked).view(t.dtype)


_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
