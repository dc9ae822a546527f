"""Mask patterns: exact top-k, exact-count random, N:M along the reduction dimension, N:M parsing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.errors import SurgeonError
from surgeon.sparsity.patterns import (
    nm_groups,
    nm_mask,
    nm_skip_reason,
    nm_ungroup,
    parse_nm,
    random_mask,
    topk_mask,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True)

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def shape_and_k(draw):
    shape = draw(shapes)
    k = draw(st.integers(0, math.prod(shape)))
    return shape, k


def _nhwc_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    if t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1).contiguous()
    return t.reshape(-1, m)


# ------------------------------------------------------------------------------------------- top-k


@FAST
@given(shape_and_k(), st.integers(0, 2**31 - 1), st.booleans())
def test_topk_exact_count_and_largest(sk, seed, integer_scores):
    shape, k = sk
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g)
    if integer_scores:  # many ties
        scores = torch.randint(-2, 3, shape, generator=g).float()
    mask = topk_mask(scores, k)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == k
    if 0 < k < scores.numel():
        kept, dropped = scores[mask], scores[~mask]
        assert kept.min() >= dropped.max()
        # ties at the boundary go to the lower flat index
        v = kept.min()
        flat, fmask = scores.reshape(-1), mask.reshape(-1)
        kept_idx = torch.nonzero(fmask & (flat == v)).flatten()
        dropped_idx = torch.nonzero(~fmask & (flat == v)).flatten()
        if len(kept_idx) and len(dropped_idx):
            assert kept_idx.max() < dropped_idx.min()


def _stable_sort_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores.reshape(-1).float(), descending=True, stable=True).indices[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


@st.composite
def tied_scores(draw):
    """Scores with many ties: few distinct values, -inf (masked-out positions), ±0.0, sometimes NaN."""
    n = draw(st.integers(1, 300))
    palette = draw(st.lists(st.sampled_from([-math.inf, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0, math.inf]), min_size=1))
    if draw(st.booleans()):
        palette.append(math.nan)
    values = draw(st.lists(st.sampled_from(palette), min_size=n, max_size=n))
    return torch.tensor(values).view(draw(st.sampled_from([(n,), (1, n)]))), draw(st.integers(0, n))


@FAST
@given(tied_scores())
def test_topk_keeps_the_stable_sorts_set(case):
    scores, k = case
    assert torch.equal(topk_mask(scores, k), _stable_sort_topk(scores, k))


@FAST
@given(tied_scores())
def test_topk_keeps_the_stable_sorts_set_through_the_sampled_bracket(case):
    # the bracket a strided sample gives large tensors, forced on small ones (with a tiny sample it often misses)
    from surgeon.sparsity import patterns

    scores, k = case
    saved = patterns._SAMPLED_SELECTION_FROM, patterns._SAMPLE
    patterns._SAMPLED_SELECTION_FROM, patterns._SAMPLE = 8, 4
    try:
        assert torch.equal(topk_mask(scores, k), _stable_sort_topk(scores, k))
    finally:
        patterns._SAMPLED_SELECTION_FROM, patterns._SAMPLE = saved


@pytest.mark.parametrize("sampled_from", [1 << 20, 1000])
@pytest.mark.parametrize("seed", range(4))
def test_topk_keeps_the_stable_sorts_set_on_large_tied_tensors(seed, sampled_from, monkeypatch):
    from surgeon.sparsity import patterns

    monkeypatch.setattr(patterns, "_SAMPLED_SELECTION_FROM", sampled_from)
    monkeypatch.setattr(patterns, "_SAMPLE", 256)
    g = torch.Generator().manual_seed(seed)
    shape = (64, 32, 3, 3)
    scores = torch.randint(0, 7, shape, generator=g).float() / 4  # 7 distinct values over 18k positions
    scores[torch.rand(shape, generator=g) < 0.3] = -torch.inf
    for k in (1, 777, scores.numel() // 2, scores.numel() - 3):
        assert torch.equal(topk_mask(scores, k), _stable_sort_topk(scores, k))
    dense = torch.randn(shape, generator=g)
    assert torch.equal(topk_mask(dense, 5000), _stable_sort_topk(dense, 5000))
    levels = torch.randint(0, 300, shape, generator=g).float()  # ties inside a bracket that spans many values
    for k in (5000, 12345):
        assert torch.equal(topk_mask(levels, k), _stable_sort_topk(levels, k))


def test_topk_independent_example_and_bounds():
    scores = torch.tensor([[0.1, 3.0, -5.0], [2.0, 2.0, 0.0]])
    # |.| is the caller's business: topk ranks the scores as given
    assert topk_mask(scores, 2).tolist() == [[False, True, False], [True, False, False]]
    assert topk_mask(scores.abs(), 2).tolist() == [[False, True, True], [False, False, False]]
    assert topk_mask(scores, 0).sum() == 0 and topk_mask(scores, 6).all()
    with pytest.raises(ValueError):
        topk_mask(scores, 7)
    with pytest.raises(ValueError):
        topk_mask(scores, -1)


# ------------------------------------------------------------------------------------------- random


@FAST
@given(shape_and_k(), st.integers(0, 2**31 - 1))
def test_random_mask_exact_count_and_seeded(sk, seed):
    shape, k = sk
    a = random_mask(shape, k, generator=torch.Generator().manual_seed(seed))
    b = random_mask(shape, k, generator=torch.Generator().manual_seed(seed))
    assert a.shape == shape and a.dtype == torch.bool
    assert int(a.sum()) == k
    assert torch.equal(a, b)


def test_random_mask_rejects_impossible_counts():
    with pytest.raises(ValueError):
        random_mask((3, 4), 13)
    with pytest.raises(ValueError):
        random_mask((3, 4), -1)
    assert random_mask((3, 4), 12).all() and not random_mask((3, 4), 0).any()


def test_random_mask_different_seeds_differ_and_is_uniform():
    a = random_mask((20, 10), 100, generator=torch.Generator().manual_seed(0))
    b = random_mask((20, 10), 100, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([random_mask((10,), 3, generator=g) for _ in range(3000)]).float()
    freq = draws.mean(dim=0)  # each position is kept with probability 3/10 (std ≈ 0.008)
    assert (freq - 0.3).abs().max() < 0.04


# ------------------------------------------------------------------------------------------- N:M


@st.composite
def nm_case(draw):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    out = draw(st.integers(1, 4))
    n_in = m * draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return (out, n_in, *kernel), n, m


@FAST
@given(nm_case(), st.integers(0, 2**31 - 1))
def test_nm_mask_valid_along_reduction_dim(case, seed):
    shape, n, m = case
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(w, n, m)
    assert keep.shape == w.shape and keep.dtype == torch.bool
    groups_keep = _nhwc_groups(keep, m)
    groups_w = _nhwc_groups(w.abs(), m)
    assert (groups_keep.sum(dim=1) == n).all()
    if n < m:  # kept entries are the N largest magnitudes of their group
        kept_min = torch.where(groups_keep, groups_w, torch.inf).min(dim=1).values
        dropped_max = torch.where(groups_keep, -torch.inf, groups_w).max(dim=1).values
        assert (kept_min >= dropped_max).all()
    assert int(keep.sum()) == w.numel() // m * n


@FAST
@given(nm_case(), st.integers(0, 2**31 - 1))
def test_nm_groups_is_nhwc_and_ungroup_inverts(case, seed):
    shape, _, m = case
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    g = nm_groups(w, m)
    assert torch.equal(g, _nhwc_groups(w, m))
    assert torch.equal(nm_ungroup(g, w.shape), w)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("1:1", (1, 1)), ("4:8", (4, 8)), ((2, 4), (2, 4))])
def test_parse_nm_accepts(text, expected):
    assert parse_nm(text) == expected


@pytest.mark.parametrize(
    "text", ["2:3:4", "5:4", "0:4", "a:b", "", "2:", ":4", "-2:4", "2.0:4", "2:0", "²:4", (2, 4.5), (0, 4), (2,)]
)
def test_parse_nm_rejects_with_surgeon_error(text):
    with pytest.raises(SurgeonError):
        parse_nm(text)


@FAST
@given(st.integers(1, 64), st.integers(1, 16), st.integers(0, 2), st.integers(1, 8))
def test_nm_skip_reason(n_in, out, n_kernel_dims, m):
    shape = (out, n_in) + (3,) * n_kernel_dims
    reason = nm_skip_reason(shape, m)
    if n_in % m == 0:
        assert reason is None
    else:
        assert isinstance(reason, str) and str(n_in) in reason and str(m) in reason


def test_nm_skip_reason_looks_at_reduction_dim_only():
    assert nm_skip_reason((6, 8), 4) is None  # out not divisible: fine
    assert nm_skip_reason((8, 2, 2, 2), 4)  # in=2, even though in·kh·kw = 8 is divisible
    assert nm_skip_reason((8,), 4)  # not a matrix


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (3, 4), (1, 8), (5, 8), (2, 16)])
@pytest.mark.parametrize("shape", [(6, 16), (4, 16, 3, 3)])
def test_nm_mask_equals_a_stable_sort_ties_included(n, m, shape):
    """The comparison path (M ≤ 8) and the sort path keep exactly what a stable descending sort keeps."""
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randint(-3, 4, shape, generator=g).float()  # few distinct magnitudes: many ties
    groups = nm_groups(w.abs(), m)
    idx = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    expected = nm_ungroup(torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True), w.shape)
    assert torch.equal(nm_mask(w, n, m), expected)


@pytest.mark.parametrize("sampled_from", [1 << 20, 1000])
@pytest.mark.parametrize("seed", range(3))
def test_topk_among_equals_the_stable_sort_with_minus_inf_outside(seed, sampled_from, monkeypatch):
    # signed scores with both zeros, ±inf and ties; `among` ranks everything outside it last, by index
    from surgeon.sparsity import patterns

    monkeypatch.setattr(patterns, "_SAMPLED_SELECTION_FROM", sampled_from)
    monkeypatch.setattr(patterns, "_SAMPLE", 256)
    g = torch.Generator().manual_seed(seed)
    shape = (48, 40, 3)
    scores = torch.randn(shape, generator=g)
    scores[torch.rand(shape, generator=g) < 0.2] = 0.0
    scores[torch.rand(shape, generator=g) < 0.1] = -0.0
    scores[torch.rand(shape, generator=g) < 0.05] = torch.randint(-3, 4, (1,), generator=g).float()
    scores.view(-1)[:7] = torch.tensor([torch.inf, -torch.inf, 5e-45, -5e-45, 3.0, -3.0, 0.0])
    among = torch.rand(shape, generator=g) < 0.6
    inside = int(among.sum())
    for k in (1, 333, inside // 2, inside, inside + 100, scores.numel() - 1):
        want = _stable_sort_topk(torch.where(among, scores, -torch.inf), k)
        if k > inside:  # past `among`, the rest by index: the sort ranks the eligible -inf first, then by index
            want = _stable_sort_topk(torch.where(among, scores.clamp(min=-1e38), -torch.inf), k)
        assert torch.equal(topk_mask(scores, k, among=among), want)
    assert torch.equal(topk_mask(scores, 500), _stable_sort_topk(scores, 500))


@pytest.mark.parametrize("seed", range(3))
def test_topk_brackets_structured_scores_and_k_near_the_among_count(seed, monkeypatch):
    # A convolution's gradient differs in scale per kernel tap, and RigL's drop keeps nearly all of a sparse layer's
    # active weights (k close to the count of `among`): the bracket must neither read one tap only nor reach down
    # into the keys outside `among`. Exact either way; the full-tensor fallback is what must not run.
    from surgeon.sparsity import patterns

    monkeypatch.setattr(patterns, "_SAMPLED_SELECTION_FROM", 1000)
    monkeypatch.setattr(patterns, "_SAMPLE", 4096)
    g = torch.Generator().manual_seed(seed)
    shape = (32, 64, 3, 3)
    tap = torch.tensor([[1.0, 0.3, 1.0], [0.3, 3.0, 0.3], [1.0, 0.3, 1.0]])
    grad = torch.randn(shape, generator=g).abs() * tap
    w = torch.randn(shape, generator=g)
    among = torch.rand(shape, generator=g) < 0.15
    searched = []
    real = torch.kthvalue
    monkeypatch.setattr(patterns.torch, "kthvalue", lambda x, k: searched.append(x.numel()) or real(x, k))
    k = int(0.95 * int(among.sum()))
    keep = topk_mask(w.abs(), k, among=among)
    assert torch.equal(keep, _stable_sort_topk(torch.where(among, w.abs(), -torch.inf), k))
    grow = topk_mask(grad, 300, among=~keep)
    assert torch.equal(grow, _stable_sort_topk(torch.where(~keep, grad, -torch.inf), 300))
    assert max(searched) < w.numel() // 4, searched
