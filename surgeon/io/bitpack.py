"""Mask bit packing: a bool tensor as 1 bit per element, laid out as ``numpy.packbits(..., bitorder="little")``.

The layout (``docs/formats.md``, "Packed masks"): the tensor is viewed as ``[shape[0], -1]`` and each row is packed
on its own, element ``8j + i`` of a row being bit ``i`` of byte ``j``; rows are padded with zero bits to whole bytes.
"""

from __future__ import annotations

import math

import torch

# Packing works on 8 mask bytes at once, read as one little-endian int64 (torch only runs on little-endian hosts)
# (byte i = bits 8i..8i+7, each 0 or 1). Multiplying by _GATHER moves byte i's bit to bit 56 + i and every cross
# term out of bits 56..63 (they are 56 + 8i - 7j for j != i: distinct, so no carries), leaving the packed byte in
# the top 8 bits.
_GATHER = 0x0102040810204080
# Unpacking is the inverse by table: byte value → the int64 whose 8 bytes are its bits, 0 or 1.
_SPREAD = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).squeeze(1)


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
    bits = mask.detach().to("cpu", torch.bool).contiguous().view(torch.uint8).reshape(rows, cols)
    if cols % 8 or bits.storage_offset() % 8:  # int64 views need whole, aligned groups of 8 bytes
        bits = torch.nn.functional.pad(bits, (0, -cols % 8))
    return ((bits.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    rows, cols = rows_cols(shape)
    bits = _SPREAD[packed.long()].view(torch.uint8)  # [rows, 8 * bytes], one 0/1 byte per element
    return bits[:, :cols].view(torch.bool).reshape(tuple(shape))
