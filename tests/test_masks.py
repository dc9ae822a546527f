"""Mask and NMMask parametrizations (docs/methods.md: the first and N:M invariants, SparseDM straight-through)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from surgeon.masking.masks import Mask, NMMask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reduction_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Independent grouping: [out, in] → along in; [out, in, *k] → permute to [out, *k, in] (NHWC), then by M."""
    if t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1).contiguous()
    return t.reshape(-1, m)


def _manual_nm(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """S(W) by plain Python: in every group of M along the reduction dim keep the N largest |w| (lower index on ties)."""
    groups = _reduction_groups(w.detach(), m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for r in range(groups.shape[0]):
        vals = groups[r].abs().tolist()
        order = sorted(range(m), key=lambda j: (-vals[j], j))[:n]
        keep[r, order] = True
    # un-group back to w's layout
    if w.dim() > 2:
        permuted = (w.shape[0], *w.shape[2:], w.shape[1])
        keep = keep.reshape(permuted).permute(0, w.dim() - 1, *range(1, w.dim() - 1))
    return keep.reshape(w.shape)


# ------------------------------------------------------------------------------------------- Mask


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mask_effective_weight_and_forward_exact(mode):
    g = _gen(0)
    lin = nn.Linear(12, 7)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(7, 12, generator=g) + 3.0)  # no accidental zeros
    mask = torch.rand(7, 12, generator=g) < 0.4
    w = lin.weight.detach().clone()
    parametrize.register_parametrization(lin, "weight", Mask(mask))
    getattr(lin, mode)()
    eff = lin.weight
    assert torch.equal(eff, w * mask)
    assert (eff[~mask] == 0).all() and (eff[mask] != 0).all()
    x = torch.randn(5, 12, generator=g)
    assert torch.equal(lin(x), F.linear(x, w * mask, lin.bias))
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, w * mask, lin.bias))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mask_stores_zero_at_pruned_positions_whatever_is_written(mode):
    # the forward reads the stored tensor as it is, so every way a weight gets in must store 0 where pruned
    g = _gen(1)
    conv = nn.Conv2d(3, 4, 3)
    mask = torch.rand(conv.weight.shape, generator=g) < 0.5
    parametrize.register_parametrization(conv, "weight", Mask(mask))
    stored = conv.parametrizations.weight.original
    assert (stored[~mask] == 0).all() and (stored[mask] != 0).all()
    getattr(conv, mode)()
    dense = torch.randn(conv.weight.shape, generator=g) + 5.0
    conv.weight = dense  # through Mask.right_inverse
    assert conv.parametrizations.weight.original is stored  # the optimizer's parameter, updated in place
    assert torch.equal(stored, dense * mask)
    x = torch.randn(2, 3, 6, 6, generator=g)
    assert (conv.weight[~mask] == 0).all()
    assert torch.equal(conv(x), F.conv2d(x, dense * mask, conv.bias))


def _masked_net(seed: int) -> nn.Module:
    from surgeon.masking.plan import plan
    from surgeon.masking.surgery import inject

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 5))
    return inject(net, plan(net, sparsity=0.6, distribution="uniform"), init="random", seed=seed)


def test_mask_load_state_dict_of_dense_values_stores_zero_at_pruned_positions():
    from surgeon.masking.surgery import sites

    net = _masked_net(0)
    state = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    for site in sites(net).values():
        assert (site.original[~site.mask] == 0).all() and (site.original[site.mask] == 7.0).all()


@pytest.mark.parametrize("accumulate", [1, 3])
def test_mask_pruned_weights_and_adamw_state_stay_exactly_zero_while_training(accumulate):
    # fails if any gradient, moment or weight-decay term reaches a pruned position (the forward would then use it)
    from surgeon.masking.surgery import sites

    net = _masked_net(1)
    found = sites(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    g = _gen(4)
    for _ in range(4):
        for _ in range(accumulate):
            x = torch.randn(4, 3, 6, 6, generator=g)
            (net(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for site in found.values():
            w, keep = site.original, site.mask
            assert (w[~keep] == 0).all() and (site.effective()[~keep] == 0).all()
            assert int((w != 0).sum()) == int(keep.sum())  # every kept weight moved off 0, none appeared
            for value in opt.state[w].values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    assert (value[~keep] == 0).all() and (value[keep] != 0).any()
    x = torch.randn(2, 3, 6, 6, generator=g)
    conv0, conv1, lin = found["0.weight"], found["2.weight"], found["4.weight"]
    h = F.conv2d(x, conv0.original.detach() * conv0.mask, net[0].bias, padding=1)
    h = F.conv2d(F.silu(h), conv1.original.detach() * conv1.mask, net[2].bias)
    assert torch.equal(net(x), F.linear(h.flatten(1), lin.original.detach() * lin.mask, net[4].bias))


def test_mask_gradient_zero_at_pruned_equals_masked_dense_grad_at_kept():
    g = _gen(2)
    lin = nn.Linear(9, 6)
    mask = torch.rand(6, 9, generator=g) < 0.5
    parametrize.register_parametrization(lin, "weight", Mask(mask))
    x = torch.randn(4, 9, generator=g)
    (lin(x) ** 2).sum().backward()
    grad = lin.parametrizations.weight.original.grad
    # manual: gradient of the loss wrt the effective weight, then through w ⊙ mask
    w_eff = (lin.parametrizations.weight.original.detach() * mask).requires_grad_()
    (F.linear(x, w_eff, lin.bias.detach()) ** 2).sum().backward()
    assert (grad[~mask] == 0).all()
    assert (grad[mask] != 0).any()
    torch.testing.assert_close(grad, w_eff.grad * mask, rtol=0, atol=0)


def _grads_of_plain_net(net: nn.Module, seed: int, accumulate: int = 1) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    for _ in range(accumulate):
        (net(torch.randn(4, 3, 6, 6, generator=g)) ** 2).mean().backward()
    return {fqn: p.grad for fqn, p in net.named_parameters()}


def _grads_of_masked_net(net: nn.Module, seed: int, accumulate: int = 1) -> dict[str, torch.Tensor]:
    from surgeon.masking.surgery import sites

    _grads_of_plain_net(net, seed, accumulate)
    return {fqn: s.original.grad for fqn, s in sites(net).items()}


@pytest.mark.parametrize("path", ["hook", "graph"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_mask_gradient_equals_the_masked_dense_gradient_on_either_path(path, accumulate):
    # "hook": inject's model, whose parameters mask their own .grad in place and whose forward returns W itself;
    # "graph": a copy of it, which masks in the autograd graph (as FSDP2's gathered weights are)
    import copy

    from surgeon.masking.surgery import fold, sites

    net = _masked_net(2) if path == "hook" else copy.deepcopy(_masked_net(2))
    found = sites(net)
    for site in found.values():
        assert (site.effective() is site.original) == (path == "hook")
    got = _grads_of_masked_net(net, 5, accumulate)
    dense = fold(_masked_net(2))  # the same weights (zero where pruned), unmasked
    want = _grads_of_plain_net(dense, 5, accumulate)
    for fqn, site in found.items():
        assert (got[fqn][~site.mask] == 0).all() and (got[fqn][site.mask] != 0).any()
        torch.testing.assert_close(got[fqn], want[fqn] * site.mask, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_zeroing_in_place_equals_torch_where_bit_for_bit(dtype, layout):
    from surgeon.masking.zeroing import keep_only_, zero_at_

    g = _gen(8)
    grad = torch.randn(6, 5, 3, 3, generator=g).to(dtype)
    grad[0, 0, 0, 0], grad[1, 0, 0, 0], grad[2, 0, 0, 0] = float("nan"), float("inf"), -0.0
    mask = torch.rand(6, 5, 3, 3, generator=g) < 0.5
    mask[:3, 0, 0, 0] = False  # the non-finite values and -0 sit at pruned positions
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        grad, mask = grad[:, :, 0, 0].t(), mask[:, :, 0, 0].t()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[grad.element_size()]
    kept, dropped = grad.clone(), grad.clone()
    want = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    keep_only_(kept, mask)
    keep_only_(kept, mask)  # the reused buffer of the first call leaves no trace
    assert torch.equal(kept.view(bits), want.view(bits))  # bit for bit: +0.0 where pruned, not NaN, inf or -0.0
    zero_at_(dropped, ~mask)
    assert torch.equal(dropped.view(bits), want.view(bits))


@pytest.mark.parametrize("path", ["hook", "graph"])
def test_a_capture_step_gives_the_whole_gradient(path):
    # RigL's update steps: dL/dW_effective at every position (summed over two micro-batches). The hook path's is
    # the parameter's own .grad (DDP's average), left whole for the optimizer (the mask update undoes what it writes
    # at pruned positions); the graph path's is this process's own, and the optimizer sees the masked gradient
    import copy

    from surgeon.masking.surgery import fold, sites

    net = _masked_net(6) if path == "hook" else copy.deepcopy(_masked_net(6))
    for site in sites(net).values():
        site.parametrization.capture_grad = True
    _grads_of_masked_net(net, 9, accumulate=2)
    want = _grads_of_plain_net(fold(_masked_net(6)), 9, accumulate=2)
    for fqn, site in sites(net).items():
        dense, averaged = site.parametrization.take_dense_grad(site.original)
        assert averaged == (path == "hook") and dense.dtype == torch.float32
        assert (dense[~site.mask] != 0).any()
        torch.testing.assert_close(dense, want[fqn], rtol=1e-6, atol=0)
        if path == "hook":
            assert dense.data_ptr() == site.original.grad.data_ptr()  # no copy
        else:
            torch.testing.assert_close(site.original.grad, want[fqn] * site.mask, rtol=1e-6, atol=0)
            assert (site.original.grad[~site.mask] == 0).all()


def test_a_copy_masks_its_gradients_and_leaves_the_original_hooked():
    import copy

    from surgeon.masking.surgery import fold, sites

    net = _masked_net(3)
    twin = copy.deepcopy(net)  # tensors' hooks are not copied: the copy masks in the graph
    for site in sites(twin).values():
        assert not site.parametrization.masks_gradient_of(site.original)
    for fqn, g in _grads_of_masked_net(twin, 6).items():
        assert (g[~sites(twin)[fqn].mask] == 0).all()
    fold(twin)  # releasing the copy's masks must not release the original's
    for fqn, g in _grads_of_masked_net(net, 6).items():
        site = sites(net)[fqn]
        assert site.parametrization.masks_gradient_of(site.original)
        assert (g[~site.mask] == 0).all() and (g[site.mask] != 0).any()


@pytest.mark.parametrize("how", ["surgeon", "torch"])
def test_an_unmasked_weight_gets_its_whole_gradient_again(how):
    from surgeon.masking.surgery import remove, sites

    net = _masked_net(4)
    masks = {fqn: s.mask.clone() for fqn, s in sites(net).items()}
    if how == "surgeon":
        remove(net)
    else:  # behind surgeon's back: the hook notices its weight is no longer parametrized
        for fqn in masks:
            module, _, name = fqn.rpartition(".")
            parametrize.remove_parametrizations(net.get_submodule(module), name, leave_parametrized=False)
    grads = _grads_of_plain_net(net, 7)
    for fqn, mask in masks.items():
        assert (grads[fqn][~mask] != 0).any()


def test_mask_buffer_is_bool_and_current_mask():
    m = Mask(torch.tensor([[1.0, 0.0], [0.5, 0.0]]))
    assert m.mask.dtype == torch.bool
    assert torch.equal(m.current_mask(torch.ones(2, 2)), torch.tensor([[True, False], [True, False]]))
    assert "mask" in dict(m.named_buffers())


# ------------------------------------------------------------------------------------------- NMMask

SHAPES = [(6, 8), (3, 12), (4, 8, 3, 3), (2, 4, 2, 5), (5, 8, 3), (2, 4, 1, 2, 3)]
NM = [(2, 4), (1, 4), (3, 4), (1, 2), (4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m", NM)
def test_nm_every_reduction_group_has_exactly_n_nonzeros_at_top_magnitudes(shape, n, m):
    if shape[1] % m:
        pytest.fail("test shapes must have a reduction size divisible by M")
    w = torch.randn(shape, generator=_gen(hash((shape, n, m)) % 1000))
    eff = NMMask(n, m)(w)
    groups = _reduction_groups(eff, m)
    assert ((groups != 0).sum(dim=1) == n).all()
    expected = _manual_nm(w, n, m)
    assert torch.equal(eff != 0, expected)
    assert torch.equal(eff, w * expected)


def test_nm_conv_groups_run_over_input_channels_not_the_flat_row():
    # in NCHW row-major order a conv row [in, kh, kw] would be grouped over kernel positions; NHWC groups channels.
    # Make one kernel position dominate across all input channels: a flat-row grouping would keep it,
    # the channel grouping must keep exactly n channels per kernel position instead.
    w = torch.full((1, 4, 2, 2), 0.1)
    w[0, :, 0, 0] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    w[0, 2, 1, 1] = 9.0
    keep = NMMask(2, 4)(w) != 0
    for kh, kw in itertools.product(range(2), range(2)):
        assert keep[0, :, kh, kw].sum() == 2
    assert keep[0, :, 0, 0].tolist() == [True, True, False, False]
    assert keep[0, 2, 1, 1]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nm_linear_module_forward_uses_projection(mode):
    g = _gen(3)
    lin = nn.Linear(8, 5)
    parametrize.register_parametrization(lin, "weight", NMMask(2, 4))
    getattr(lin, mode)()
    w = lin.parametrizations.weight.original.detach()
    s = w * _manual_nm(w, 2, 4)
    x = torch.randn(3, 8, generator=g)
    assert torch.equal(lin.weight, s)
    assert torch.equal(lin(x), F.linear(x, s, lin.bias))


@pytest.mark.parametrize("shape", [(6, 8), (4, 8, 3, 3)])
def test_nm_straight_through_gradient_without_regularizer(shape):
    g = _gen(4)
    w = torch.randn(shape, generator=g).requires_grad_()
    up = torch.randn(shape, generator=g)
    NMMask(2, 4, lambda_w=0.0)(w).backward(up)
    assert torch.equal(w.grad, up)  # including pruned positions: straight through


@pytest.mark.parametrize("shape", [(6, 8), (4, 8, 3, 3)])
@pytest.mark.parametrize("lam", [2e-4, 0.5])
def test_nm_sr_ste_gradient_matches_manual(shape, lam):
    g = _gen(5)
    w = torch.randn(shape, generator=g).requires_grad_()
    up = torch.randn(shape, generator=g)
    NMMask(2, 4, lambda_w=lam)(w).backward(up)
    s = w.detach() * _manual_nm(w, 2, 4)
    expected = up + lam * (w.detach() - s)
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=1e-7)
    pruned = ~_manual_nm(w, 2, 4)
    assert not torch.equal(w.grad[pruned], up[pruned])  # the term is really there


def test_nm_sr_ste_through_a_module_loss():
    g = _gen(6)
    lin = nn.Linear(8, 4)
    lam = 0.3
    parametrize.register_parametrization(lin, "weight", NMMask(2, 4, lambda_w=lam))
    x = torch.randn(5, 8, generator=g)
    (lin(x) ** 2).sum().backward()
    w = lin.parametrizations.weight.original.detach()
    keep = _manual_nm(w, 2, 4)
    w_eff = (w * keep).requires_grad_()
    (F.linear(x, w_eff, lin.bias.detach()) ** 2).sum().backward()
    expected = w_eff.grad + lam * (w - w * keep)
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, expected, rtol=1e-6, atol=1e-6)


def test_nm_ties_are_deterministic_and_keep_lower_index():
    lin_w = torch.ones(3, 8)
    keep = NMMask(2, 4)(lin_w) != 0
    assert keep.tolist() == [[True, True, False, False] * 2] * 3
    signed = torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0.5, -0.5, 0.5, -0.5]])
    assert (NMMask(1, 4)(signed) != 0).tolist() == [[True, False, False, False, True, False, False, False]]
    conv_w = torch.ones(2, 8, 3, 3)
    keep = NMMask(2, 4)(conv_w) != 0
    # at every (out, kh, kw): input channels 0,1 of the first group and 4,5 of the second
    assert torch.equal(keep.sum(dim=(0, 2, 3)), torch.tensor([18, 18, 0, 0, 18, 18, 0, 0]))
    again = [NMMask(2, 4)(conv_w) != 0 for _ in range(3)]
    assert all(torch.equal(a, keep) for a in again)


def test_nm_current_mask_matches_forward():
    w = torch.randn(4, 8, 3, 3, generator=_gen(7))
    p = NMMask(1, 4)
    assert torch.equal(p.current_mask(w), p(w) != 0)
    assert p.current_mask(w).sum() == w.numel() // 4


def test_zeroing_reuses_words_only_for_the_same_unchanged_flags():
    from surgeon.masking.zeroing import keep_only_, zero_at_

    g = _gen(11)
    flags = torch.rand(40, 30, generator=g) < 0.5
    a, b, c = (torch.randn(40, 30, generator=g) for _ in range(3))
    want_a, want_b = torch.where(flags, 0.0, a), torch.where(flags, 0.0, b)
    zero_at_(a, flags)
    zero_at_(b, flags)  # the same flags: the words are reused
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
    flags[0].logical_not_()  # changed in place: widened again
    want_c = torch.where(flags, 0.0, c)
    zero_at_(c, flags)
    assert torch.equal(c, want_c)
    d = torch.randn(40, 30, generator=g)
    keep_only_(d, flags)  # same flags, the other polarity
    assert torch.equal(d, torch.where(flags, d, 0.0)) and (d[~flags] == 0).all() and (d[flags] != 0).all()
