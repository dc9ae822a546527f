"""Mask patterns: exact top-k, random with an exact count, and N:M along the reduction dimension.

All counts are exact (never Bernoulli). Ties in top-k break towards the lower flat index, so masks are
deterministic across runs and processes.
"""

from __future__ import annotations

import torch

from surgeon.errors import SurgeonError


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``scores.shape`` with exactly ``k`` True at the largest scores (ties → lower index).

    The kept set is the first ``k`` of a stable descending sort, found at selection cost: the k-th largest value by
    ``kthvalue``, every score above it, then the lowest-index scores equal to it until ``k`` are kept (a full sort
    costs about 3.5× as much on a 14.7M-weight layer). NaN ranks above every number, as in the sort.
    """
    flat = scores.detach().reshape(-1)
    k, n = int(k), flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    x = flat.float()
    if k in (0, n):
        return torch.full(scores.shape, k == n, dtype=torch.bool, device=flat.device)
    # kthvalue has no rank for NaN; the sort puts it first. A sum is NaN when any score is (or when +inf and -inf
    # meet), and costs one read without the bool tensor isnan would allocate: the exact check runs only then.
    if bool(torch.isnan(x.sum())) and bool(torch.isnan(x).any()):
        order = torch.sort(x, descending=True, stable=True).indices[:k]
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[order] = True
        return mask.view(scores.shape)
    kth = _kth_largest(x, k)
    mask = x > kth
    short = k - int(torch.count_nonzero(mask))
    if short:
        ties = torch.nonzero(x == kth).squeeze(1)[:short]  # nonzero lists indices in ascending order
        mask[ties] = True
    return mask.view(scores.shape)


_SAMPLED_SELECTION_FROM = 1 << 20  # below this many scores one kthvalue is cheap enough
_SAMPLE = 1 << 16


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D, NaN-free ``x`` (1 ≤ k < len), exactly.

    Large tensors: two order statistics of an evenly strided sample bracket it (8 standard deviations of the rank
    estimate either side), a few comparisons count what lies above and keep the few percent inside, and kthvalue
    runs on those alone; a bracket that misses (it cannot be wrong, only useless) falls back to the full kthvalue.
    """
    n = x.numel()
    if n < _SAMPLED_SELECTION_FROM:
        return torch.kthvalue(x, n - k + 1).values
    sample = torch.sort(x[:: n // _SAMPLE].contiguous(), descending=True).values
    m = sample.numel()
    rank, margin = k / n * m, 8 * (m * (k / n) * (1 - k / n)) ** 0.5 + 8
    hi, lo = sample[max(int(rank - margin), 0)], sample[min(int(rank + margin), m - 1)]
    above = int(torch.count_nonzero(x > hi))  # count_nonzero: several times faster than a bool sum on CPU
    if above < k:
        if bool(hi == lo):
            if above + int(torch.count_nonzero(x == hi)) >= k:
                return hi
        else:
            inside = x[torch.nonzero((x >= lo) & (x <= hi)).squeeze(1)]  # faster than a bool-mask select
            if above + inside.numel() >= k:
                return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(x, n - k + 1).values


def random_mask(shape, k: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Bool mask with exactly ``k`` True positions drawn uniformly without replacement."""
    n = 1
    for s in shape:
        n *= int(s)
    k = int(k)
    if not 0 <= k <= n:  # randperm(n)[:k] would silently keep n (k > n) or n + k (k < 0) positions
        raise ValueError(f"k={k} outside [0, {n}]")
    idx = torch.randperm(n, generator=generator)[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask.view(tuple(shape)).to(device) if device is not None else mask.view(tuple(shape))


def parse_nm(nm: str | tuple[int, int]) -> tuple[int, int]:
    """ "2:4" → (2, 4); rejects anything but two integers with 0 < N ≤ M."""
    if isinstance(nm, (tuple, list)):
        parts = [str(p) for p in nm]
    else:
        parts = str(nm).split(":")
    hint = "write N:M with 0 < N <= M, e.g. 2:4"
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):  # "²" isdigit
        raise SurgeonError(f"invalid N:M pattern {nm!r}", hint)
    n, m = (int(p) for p in parts)
    if not 0 < n <= m:
        raise SurgeonError(f"invalid N:M pattern {nm!r}: need 0 < N <= M", hint)
    return n, m


def nm_groups(w: torch.Tensor, m: int) -> torch.Tensor:
    """View ``w`` as ``[-1, m]`` groups along the reduction (input) dimension.

    Linear/RNN ``[out, in]`` group along ``in``; Conv ``[out, in, *k]`` is permuted to ``[out, *k, in]`` (NHWC order)
    first, so each group holds M input channels at one kernel position.
    """
    if w.dim() > 2:
        w = w.movedim(1, -1)
    return w.reshape(-1, m)


def nm_ungroup(g: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`nm_groups` for a tensor of ``shape``."""
    shape = tuple(shape)
    if len(shape) > 2:
        permuted = (shape[0],) + shape[2:] + (shape[1],)
        return g.reshape(permuted).movedim(-1, 1)
    return g.reshape(shape)


_RANK_BY_COMPARISON_UP_TO_M = 8  # beyond this, m² comparisons cost more than one sort


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| of every ``m`` along the reduction dimension (ties → lower index).

    Runs every forward of an N:M straight-through layer, so it is on the training step's critical path. For small
    M each weight's rank in its group is counted by M·(M−1)/2 elementwise comparisons of contiguous group columns
    (each pair once; about 4× faster than a sort of [groups, M] on CPU at M = 4); larger M sorts. Both break ties the same way.
    """
    groups = nm_groups(w.detach().abs(), m)
    if m <= _RANK_BY_COMPARISON_UP_TO_M:
        cols = groups.t().contiguous().unbind(0)  # contiguous columns: every comparison streams through memory
        beaten_by = [torch.zeros_like(cols[0], dtype=torch.uint8) for _ in range(m)]  # how many rank above each
        for i in range(m):
            for j in range(i + 1, m):  # each pair compared once; an equal weight at the lower index ranks above
                i_above = cols[i] >= cols[j]
                beaten_by[j] += i_above
                beaten_by[i] += ~i_above
        keep = torch.stack([b < n for b in beaten_by], 1)
    else:
        # stable descending sort: equal magnitudes keep their order, so the lower index wins
        idx = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    return nm_ungroup(keep, w.shape)


def nm_skip_reason(shape, m: int) -> str | None:
    """Why a tensor of ``shape`` cannot take an N:M pattern with group size ``m`` (None when it can)."""
    if len(shape) < 2:
        return "not a matrix"
    if shape[1] % m:
        return f"reduction size {shape[1]} is not divisible by M={m}"
    return None
