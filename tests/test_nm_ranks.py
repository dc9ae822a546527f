"""The N:M rank kernel (surgeon.sparsity.nm_ranks) against the pairwise-comparison and sort implementation it
replaced, kept here as the reference: the same kept set for every input, ties, ±0, NaN and ±inf included."""

from __future__ import annotations

import pytest
import torch

from surgeon.sparsity import nm_ranks
from surgeon.sparsity.patterns import nm_apply, nm_decay_pruned, nm_groups, nm_mask, nm_ungroup

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(6, 16), (3, 32), (4, 16, 3, 3), (5, 16, 3), (3, 16, 1, 2, 3), (2, 16, 1, 1)]
NM = [(n, m) for m in (1, 2, 4, 8, 16) for n in range(1, m + 1)]


def reference_nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The implementation before the rank kernel: groups copied into columns, each pair compared once (M ≤ 8), or a
    stable descending sort (M > 8)."""
    groups = nm_groups(w.detach().abs(), m)
    if m <= 8:
        cols = groups.t().contiguous().unbind(0)
        beaten_by = [torch.zeros_like(cols[0], dtype=torch.uint8) for _ in range(m)]
        for i in range(m):
            for j in range(i + 1, m):
                i_above = cols[i] >= cols[j]
                beaten_by[j] += i_above
                beaten_by[i] += ~i_above
        keep = torch.stack([b < n for b in beaten_by], 1)
    else:
        idx = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    return nm_ungroup(keep, w.shape)


def tied(shape, dtype, seed: int) -> torch.Tensor:
    """Few distinct magnitudes (many ties), both zeros, NaN and ±inf."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, shape, generator=g).to(dtype)
    flat = w.view(-1)
    flat[::7] = -0.0
    flat[3::11] = float("nan")
    flat[5::13] = float("inf")
    flat[6::17] = -float("inf")
    return w


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 differs from +0.0), except that any NaN equals any NaN: a NaN's payload depends
    on which of torch's loops (vectorised or not) made it, not on the mask."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    words = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(words)[~nan], b.view(words)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_keeps_the_reference_set(shape, dtype):
    for n, m in NM:
        if shape[1] % m == 0:
            w = tied(shape, dtype, seed=n * 100 + m)
            assert torch.equal(nm_mask(w, n, m), reference_nm_mask(w, n, m)), (n, m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 16), (4, 16, 3, 3)])
def test_effective_weight_and_decay_are_the_reference_products(shape, dtype):
    g = torch.Generator().manual_seed(1)
    for n, m in NM:
        w = tied(shape, dtype, seed=m)
        keep = reference_nm_mask(w, n, m)
        assert same_bits(nm_apply(w, n, m), w * keep), (n, m)
        grad = torch.randn(shape, generator=g).to(dtype)
        assert same_bits(nm_decay_pruned(grad, w, n, m, 0.3), grad + 0.3 * w * ~keep), (n, m)


@pytest.mark.parametrize("shape", [(40, 64), (12, 32, 3, 3)])
def test_chunks_split_on_group_boundaries(shape, monkeypatch):
    # chunks much smaller than the tensor, with a short last chunk: the periodic masks must line up with every one
    monkeypatch.setattr(nm_ranks, "_CHUNK", 100)
    for n, m in [(2, 4), (1, 4), (3, 8), (1, 2)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(m + n))
        assert torch.equal(nm_mask(w, n, m), reference_nm_mask(w, n, m)), (n, m)


def test_at_most_n_nonzeros_in_every_group():
    """The invariant itself, checked on the effective weight (not on the kernel's own mask)."""
    for n, m in [(2, 4), (1, 4), (4, 8), (1, 2)]:
        for shape in [(8, 32), (6, 16, 3, 3)]:
            w = torch.randn(shape, generator=torch.Generator().manual_seed(n + m)) + 5.0  # no zeros of its own
            groups = nm_groups(nm_apply(w, n, m) != 0, m)
            assert int(torch.count_nonzero(groups, dim=1).max()) <= n
            assert int(torch.count_nonzero(groups)) == groups.shape[0] * n


def test_non_contiguous_weight_is_ranked_in_its_logical_layout():
    w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(2)).to(memory_format=torch.channels_last)
    assert torch.equal(nm_mask(w, 2, 4), reference_nm_mask(w, 2, 4))
    assert torch.equal(nm_apply(w, 2, 4), w * reference_nm_mask(w, 2, 4))
