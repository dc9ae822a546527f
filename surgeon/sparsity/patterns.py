"""Mask patterns: exact top-k, random with an exact count, and N:M along the reduction dimension.

All counts are exact (never Bernoulli). Ties in top-k break towards the lower flat index, so masks are
deterministic across runs and processes.
"""

from __future__ import annotations

import torch

from surgeon import seeding
from surgeon.errors import SurgeonError
from surgeon.sparsity import nm_ranks
from surgeon.sparsity.scratch import buffer, widened


def topk_mask(scores: torch.Tensor, k: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of ``scores.shape`` with exactly ``k`` True at the largest scores (ties → lower index).

    ``among`` (bool, the shape of ``scores``): only its True positions compete; every other one ranks below all of
    them, as a score of -inf below any real score would (so ``k`` above their count takes the rest by index).

    The kept set is the first ``k`` of a stable descending sort (NaN first, -0.0 equal to +0.0), found at selection
    cost: scores become integer keys of the same order (a float's bits, the negative ones flipped), the k-th
    largest key is found by :func:`_kth_largest`, every key above it is kept, then the lowest-index keys equal to
    it until ``k`` are kept.
    """
    flat = scores.detach().reshape(-1)
    k, n = int(k), flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    if among is not None:
        among = among.reshape(-1).to(flat.device)
    if k in (0, n):
        return torch.full(scores.shape, k == n, dtype=torch.bool, device=flat.device)
    if flat.is_floating_point() or flat.is_complex():
        x = flat.float()
        # keys have no rank for NaN; the sort puts it first. A sum is NaN when any score is (or when +inf and -inf
        # meet), and costs one read without the bool tensor isnan would allocate: the exact check runs only then.
        if bool(torch.isnan(x.sum())) and bool(torch.isnan(x).any()):
            return _sorted_topk(x if among is None else torch.where(among, x, -torch.inf), k).view(scores.shape)
        keys = _ordered_keys(x)
    else:
        keys = flat.to(torch.int64, copy=True)
    floor = None
    if among is not None:
        _floor_outside(keys, among)
        # a float's key is never the floor, so when ``among`` holds k the k-th largest lies above it: a bracket that
        # reaches down into the floored keys (k close to their count) can stop just above them
        if keys.dtype == torch.int32 and k <= int(torch.count_nonzero(among)):
            floor = torch.iinfo(torch.int32).min
    kth, candidates = _kth_largest(keys, k, floor)
    mask = keys > kth
    short = k - int(torch.count_nonzero(mask))
    if short:
        if candidates is None:
            ties = torch.nonzero(keys == kth).squeeze(1)  # nonzero lists indices in ascending order
        else:
            # every key equal to kth lies in the bracket (index_select: 4x faster than x[indices] on CPU)
            ties = candidates[keys.index_select(0, candidates) == kth]
        mask.index_fill_(0, ties[:short], True)
    return mask.view(scores.shape)


def _sorted_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(x, descending=True, stable=True).indices[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order] = True
    return mask


def _ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys (a reused buffer) ordered as the NaN-free float32 ``x`` is: equal floats, equal keys."""
    keys = buffer("topk.keys", x.shape, torch.int32, x.device)
    torch.add(x, 0.0, out=keys.view(torch.float32))  # -0.0 + 0.0 = +0.0: the two zeros get one key
    if bool(x.min() < 0):  # a negative float's bits order backwards: flip all but the sign bit
        flip = buffer("topk.flip", x.shape, torch.int32, x.device)
        torch.bitwise_right_shift(keys, 31, out=flip).bitwise_and_(0x7FFFFFFF)
        keys.bitwise_xor_(flip)
    return keys


def _floor_outside(keys: torch.Tensor, among: torch.Tensor) -> None:
    """Set the keys outside ``among`` to the smallest integer, which no key of a NaN-free score takes."""
    words = widened(among, keys.dtype, True, slot="topk.among")
    keys.bitwise_and_(words)
    keys.bitwise_or_(words.bitwise_not_().bitwise_and_(torch.iinfo(keys.dtype).min))


# below this many keys one kthvalue (about 57 ns a key on a CPU at one thread) is cheaper than sampling
_SAMPLED_SELECTION_FROM = 1 << 15
_SAMPLE = 1 << 16  # the most keys sampled: 1 in 16 of a smaller tensor
_SAMPLE_SEED = 0  # the sample only sets the speed: the kept set is exact whatever it holds


def _kth_largest(x: torch.Tensor, k: int, floor: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k-th largest value of the 1-D ``x`` (1 ≤ k < len), exactly, and the ascending indices of a bracket of
    values around it that holds every value equal to it (None when the whole of ``x`` was searched). ``floor``: a
    value the k-th largest is known to lie above.

    Large tensors: two order statistics of a sample at pseudo-random positions bracket it (8 standard deviations of
    the rank estimate either side), a few comparisons count what lies above and keep the few percent inside, and the
    search goes on inside those alone; a bracket that misses (it cannot be wrong, only useless) falls back to the
    full kthvalue. The positions are random (from a fixed seed: the same every call) because an even stride samples
    a weight's structure: a stride that divides a convolution's 3x3 taps reads one kernel position only.
    """
    n = x.numel()
    if n < _SAMPLED_SELECTION_FROM:
        return torch.kthvalue(x, n - k + 1).values, None
    m = min(_SAMPLE, max(n // 16, 1))
    positions = torch.randint(n, (m,), generator=seeding.generator(_SAMPLE_SEED)).to(x.device)
    sample = torch.sort(x.index_select(0, positions), descending=True).values
    rank, margin = k / n * m, 8 * (m * (k / n) * (1 - k / n)) ** 0.5 + 8
    hi, lo = sample[max(int(rank - margin), 0)], sample[min(int(rank + margin), m - 1)]
    if floor is not None and bool(lo <= floor):
        lo = torch.full_like(lo, floor + 1)
        hi = torch.maximum(hi, lo)
    over = torch.gt(x, hi, out=buffer("topk.over", x.shape, torch.bool, x.device))
    above = int(torch.count_nonzero(over))  # count_nonzero: several times faster than a bool sum on CPU
    if above < k:
        if bool(hi == lo):  # a value so common that the bracket is that value alone
            if above + int(torch.count_nonzero(x == hi)) >= k:
                return hi, None
        else:
            bracket = torch.ge(x, lo, out=buffer("topk.bracket", x.shape, torch.bool, x.device)).bitwise_xor_(over)
            inside = torch.nonzero(bracket).squeeze(1)  # lo <= x <= hi; faster than a bool-mask select
            if above + inside.numel() >= k:
                values, rank = x.index_select(0, inside), k - above
                if inside.numel() < n // 2:  # the bracket narrowed the search: narrow it again
                    return _kth_largest(values, rank, floor)[0], inside
                return torch.kthvalue(values, values.numel() - rank + 1).values, inside
    return torch.kthvalue(x, n - k + 1).values, None


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


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| of every ``m`` along the reduction dimension (ties → lower index), as bool.

    M ≤ 8: the rank kernel of :mod:`surgeon.sparsity.nm_ranks` (pairwise comparisons, each pair once); larger M
    sorts. Both break ties the same way.
    """
    if not _ranks_in_place(w, m):
        return _nm_mask_by_ops(w, n, m)
    w = w.detach().contiguous()
    keep = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    flat = keep.view(-1)
    for span, _, count, threshold in nm_ranks.chunks(w, n, m):
        torch.lt(count, threshold, out=flat[span])
    return keep


def nm_apply(w: torch.Tensor, n: int, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The effective weight ``w * nm_mask(w, n, m)`` (bit for bit: pruned entries are ±0, or NaN where w is
    non-finite), made chunk by chunk into ``out`` (contiguous, w's shape and dtype; default a new tensor): about one
    read of ``w`` and one write of the result."""
    if not _ranks_in_place(w, m):
        return w * _nm_mask_by_ops(w, n, m)
    w = w.detach().contiguous()
    if out is None:
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
    return nm_ranks.apply_chunked(w, n, m, out, lambda chunk, keep, into: torch.mul(chunk, keep, out=into))


def nm_decay_pruned(grad: torch.Tensor, w: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:
    """``grad + decay * w * ~nm_mask(w, n, m)`` (SR-STE's λ_W·(W − S(W))), bit for bit, in a new tensor."""
    if not (_ranks_in_place(w, m) and _ranks_in_place(grad, m) and grad.shape == w.shape and grad.dtype == w.dtype):
        return grad + decay * w * ~_nm_mask_by_ops(w, n, m)
    w, grad = w.detach().contiguous(), grad.contiguous()
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    flat_grad = grad.view(-1)
    pruned = None
    for span, chunk, count, threshold in nm_ranks.chunks(w, n, m):
        if pruned is None or pruned.numel() != chunk.numel():
            pruned = buffer("nm.pruned", (chunk.numel(),), chunk.dtype, chunk.device)  # same dtype: see apply_chunked
            term = buffer("nm.term", (chunk.numel(),), chunk.dtype, chunk.device)
        torch.ge(count, threshold, out=pruned)
        torch.mul(chunk, decay, out=term).mul_(pruned)
        torch.add(flat_grad[span], term, out=out.view(-1)[span])
    return out


def _ranks_in_place(w: torch.Tensor, m: int) -> bool:
    """Whether the rank kernel takes ``w``: M ≤ 8 and a plain tensor (a DTensor's shards cannot be viewed flat)."""
    return m <= nm_ranks.RANKED_UP_TO_M and type(w) in (torch.Tensor, torch.nn.Parameter) and w.numel() > 0


def _nm_mask_by_ops(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """nm_mask in whole-tensor ops any tensor type supports: ranks by comparison (M ≤ 8) or a stable sort."""
    groups = nm_groups(w.detach().abs(), m)
    if m <= nm_ranks.RANKED_UP_TO_M:
        cols = groups.t().contiguous().unbind(0)
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
