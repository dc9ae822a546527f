"""The N:M rank kernel: which entries of each group of M along the reduction dimension rank among its N largest |w|.

It runs on every forward of an N:M straight-through layer, so it is built to cost little more than one read of W
and one write of its result, in plain torch ops (no compiler in CI).

Layout. Viewed flat, a Linear ``[out, in]`` holds its groups as runs of M adjacent entries; a conv ``[out, in, *k]``
holds group member j of a group at stride K = prod(k) (M input channels at one kernel position). With t a flat
index and j(t) its member, member j + s of t's group lies at t + s·K. So ``ge(a[:-sK], a[sK:])`` compares every
member with the one s places above it in one contiguous, vectorised op over the whole chunk, for all groups at once
(at the positions where j + s ≥ M it compares across groups; a periodic 0/1 mask clears those). No copy of W into
group order is ever made.

Ranks. Exactly as the pairwise comparison always ranked (each pair i < j compared once by ``|w_i| >= |w_j|``; the
lower index wins ties; a comparison with NaN is False, so the higher index wins it): the number of members ranked
above j is ``(M-1-j) + Σ_s [i=j-s above j] − Σ_s [j above j+s]``, kept where it is below N. The counts are int8
(M ≤ 8 here), the thresholds ``N − (M−1−j)`` a periodic int8 constant.

Chunks. W is processed in chunks of whole groups small enough that the chunk's |w|, comparison and count buffers
stay in the L2 cache (reused per-thread buffers, :func:`surgeon.sparsity.scratch.buffer`); about a dozen ops per
chunk, each streaming through cache. On another device the whole tensor is one chunk (its ops are launches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from surgeon.sparsity.scratch import buffer

RANKED_UP_TO_M = 8  # int8 counts; beyond this the M-1 shifted passes cost more than the sort nm_mask falls back to

# 128K entries: |w| (512 KiB in float32) and three int8 buffers fit a 1 MiB L2; 64K costs 1.5x more in per-op
# overhead on CPU, 256K spills (measured on a 1280x5120 Linear and a 1280x1280x3x3 conv at one thread)
_CHUNK = 1 << 17

_PERIODIC: dict[tuple[int, int, int, torch.device], tuple[list[torch.Tensor], torch.Tensor]] = {}


def _periodic(n: int, m: int, k: int, length: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(``valid[s]``: 1 where member j + s is in the same group, for s in 1..M-1; the int8 keep thresholds), at
    least ``length`` long. Every chunk starts a group, so one pattern per (N, M, K) serves every chunk, sliced."""
    key = (n, m, k, device)
    held = _PERIODIC.get(key)
    if held is None or held[1].numel() < length:
        member = (torch.arange(length, device=device) // k) % m
        valid = [(member + s <= m - 1).to(torch.int8) for s in range(m)]
        held = _PERIODIC[key] = (valid, (n - (m - 1 - member)).to(torch.int8))
    return held


def chunks(w: torch.Tensor, n: int, m: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(span, w_chunk, count, threshold)`` over the flat, contiguous ``w`` (M ≤ RANKED_UP_TO_M): an entry
    of ``w_chunk`` is kept where ``count < threshold``. ``count`` is a reused buffer, overwritten by the next chunk."""
    flat = w.detach().reshape(-1)
    k = math.prod(w.shape[2:])
    period = m * k
    total = flat.numel()
    full_chunk = total if flat.device.type != "cpu" else max(1, _CHUNK // period) * period
    length = min(total, full_chunk)
    valid, threshold = _periodic(n, m, k, full_chunk, flat.device)
    magnitudes = buffer("nm.abs", (length,), flat.dtype, flat.device)
    above = buffer("nm.above", (length,), torch.int8, flat.device)
    count = buffer("nm.count", (length,), torch.int8, flat.device)
    views = _views(magnitudes, above, count, valid, m, k, length)
    for start in range(0, total, length):
        size = min(length, total - start)
        if size != length:
            views = _views(magnitudes[:size], above[:size], count[:size], valid, m, k, size)
        chunk = flat[start : start + size]
        torch.abs(chunk, out=views[0])
        views[1].zero_()
        for lower, upper, into, mask, count_lower, count_upper in views[2]:
            torch.ge(lower, upper, out=into)  # member j at least |member j+s|: j ranks above j+s
            count_lower.addcmul_(into, mask, value=-1)  # j: one fewer above it than the M-1-j its threshold assumes
            count_upper.addcmul_(into, mask)  # j+s: one more above it
        yield slice(start, start + size), chunk, views[1], threshold[:size]


def _views(magnitudes, above, count, valid, m: int, k: int, size: int):
    """The slices one chunk's ops read and write, made once per chunk size (a view costs as much as a small op)."""
    shifted = []
    for s in range(1, m):
        end = size - s * k
        shifted.append(
            (magnitudes[:end], magnitudes[s * k :], above[:end], valid[s][:end], count[:end], count[s * k :])
        )
    return magnitudes, count, shifted


def apply_chunked(
    w: torch.Tensor,
    n: int,
    m: int,
    out: torch.Tensor,
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
) -> torch.Tensor:
    """Run :func:`chunks` over ``w`` and let ``write(w_chunk, keep, out_chunk)`` fill each chunk of ``out``; ``keep``
    is 1 or 0 in ``w``'s dtype, so a product with it is exactly the product with a bool mask (same-dtype operands;
    a uint8 one takes a mixed-type kernel that changes a bfloat16 NaN's bits)."""
    flat_out = out.view(-1)
    keep = None
    for span, chunk, count, threshold in chunks(w, n, m):
        if keep is None or keep.numel() != chunk.numel():
            keep = buffer("nm.keep", (chunk.numel(),), chunk.dtype, chunk.device)
        torch.lt(count, threshold, out=keep)
        write(chunk, keep, flat_out[span])
    return out
