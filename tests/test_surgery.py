"""inject / fold / remove / sites: docs/methods.md invariants on tiny diffusers presets and on GRU/LSTM modules."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from surgeon.errors import SurgeonError
from surgeon.masking.masks import Mask, NMMask
from surgeon.masking.plan import Plan, plan
from surgeon.masking.surgery import fold, get_plan, inject, remove, sites

TINY_PRESETS = ("tiny-unet", "tiny-unet-cond", "tiny-unet1d", "tiny-dit")


def _masks(model) -> dict[str, torch.Tensor]:
    return {fqn: s.mask.clone() for fqn, s in sites(model).items()}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _nhwc_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    if t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1).contiguous()
    return t.reshape(-1, m)


def _no_parametrizations(model) -> bool:
    return not any(parametrize.is_parametrized(m) for m in model.modules())


# ------------------------------------------------------------------------------------------- inject


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_inject_random_in_place_exact_counts(name, build_preset):
    model = build_preset(name)
    params_before = dict(model.named_parameters())
    p = plan(model, sparsity=0.8, distribution="erk")
    assert inject(model, p, init="random", seed=3) is model
    assert get_plan(model) is p
    ss = sites(model)
    planned = {f for f, lp in p.layers.items() if not lp.is_dense}
    assert set(ss) == planned and planned
    for fqn, lp in p.layers.items():
        if lp.is_dense:
            continue
        s = ss[fqn]
        assert s.original is params_before[fqn]  # the same Parameter object: in place
        assert isinstance(s.parametrization, Mask) and s.mask.dtype == torch.bool
        assert int(s.mask.sum()) == lp.kept
        assert (s.original[~s.mask] == 0).all()  # stored tensor zeroed at pruned positions
        assert torch.equal(s.effective(), s.original * s.mask)
    for fqn, lp in p.layers.items():
        if lp.is_dense:
            module_name, _, tname = fqn.rpartition(".")
            assert not parametrize.is_parametrized(model.get_submodule(module_name), tname)


def test_inject_random_is_seeded_and_independent_of_weights(build_preset):
    def masks_for(model_seed, mask_seed):
        m = build_preset("tiny-unet", seed=model_seed)
        inject(m, plan(m, sparsity=0.5, distribution="uniform"), init="random", seed=mask_seed)
        return _masks(m)

    a, b = masks_for(0, 7), masks_for(0, 7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = masks_for(1, 7)  # other weights, same seed: random masks never look at the weights
    assert all(torch.equal(a[k], c[k]) for k in a)
    d = masks_for(0, 8)
    assert sum(not torch.equal(a[k], d[k]) for k in a) >= len(a) - 1


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-dit"])
def test_inject_magnitude_keeps_largest(name, build_preset):
    model = build_preset(name)
    before = _weights(model)
    p = plan(model, sparsity=0.6, distribution="uniform")
    inject(model, p, init="magnitude")
    for fqn, s in sites(model).items():
        mag = before[fqn].abs()
        mask = s.mask
        assert int(mask.sum()) == p.layers[fqn].kept
        assert mag[mask].min() >= mag[~mask].max()
        assert torch.equal(s.original[mask], before[fqn][mask])  # kept values untouched


def test_unknown_init_is_rejected(build_preset):
    model = build_preset("tiny-unet")
    with pytest.raises(SurgeonError):
        inject(model, plan(model, sparsity=0.5), init="bernoulli")
    assert not sites(model)


def test_injecting_twice_raises_and_leaves_masks(build_preset):
    model = build_preset("tiny-unet")
    p = plan(model, sparsity=0.5, distribution="uniform")
    inject(model, p, init="random", seed=0)
    masks = _masks(model)
    with pytest.raises(SurgeonError):
        inject(model, p, init="random", seed=1)
    with pytest.raises(SurgeonError):
        inject(model, plan(model, sparsity=0.5, distribution="uniform"), init="random", seed=1)
    after = _masks(model)
    assert after.keys() == masks.keys() and all(torch.equal(after[k], masks[k]) for k in masks)
    assert all(len(s.module.parametrizations[s.name]) == 1 for s in sites(model).values())


def test_plan_from_another_model_raises_and_leaves_model_untouched():
    a = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2))  # same names, other shapes
    before = _weights(a)
    with pytest.raises(SurgeonError):
        inject(a, plan(b, sparsity=0.5, distribution="uniform"), init="random")
    assert not sites(a) and _no_parametrizations(a) and get_plan(a) is None
    assert all(torch.equal(before[k], v) for k, v in _weights(a).items())
    c = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(2, 2))  # names a lacks
    with pytest.raises(SurgeonError):
        inject(a, plan(c, sparsity=0.5, distribution="uniform"), init="random")
    assert not sites(a) and _no_parametrizations(a)


def test_explicit_masks_are_used_exactly_and_checked():
    model = nn.Sequential(nn.Linear(6, 4), nn.Conv1d(4, 4, 3))
    p = plan(model, sparsity=0.5, distribution="uniform")
    g = torch.Generator().manual_seed(0)
    given = {f: torch.rand(lp.shape, generator=g) < 0.3 for f, lp in p.layers.items()}
    before = _weights(model)
    with pytest.raises(SurgeonError):  # one missing
        inject(model, p, masks={"0.weight": given["0.weight"]})
    with pytest.raises(SurgeonError):  # one of the wrong shape
        inject(model, p, masks={"0.weight": given["0.weight"], "1.weight": torch.ones(4, 4, dtype=torch.bool)})
    assert not sites(model) and all(torch.equal(before[k], v) for k, v in _weights(model).items())
    inject(model, p, masks=given)
    for fqn, s in sites(model).items():
        assert torch.equal(s.mask, given[fqn])
        assert torch.equal(s.effective(), before[fqn] * given[fqn])


# ------------------------------------------------------------------------------------------- fold / remove


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_fold_gives_stock_state_dict_and_identical_outputs(name, build_preset, run_preset):
    model = build_preset(name)
    inject(model, plan(model, sparsity=0.6, distribution="erk"), init="magnitude")
    masks = _masks(model)
    y = run_preset(name, model)
    assert fold(model) is model
    assert _no_parametrizations(model) and not sites(model) and get_plan(model) is None
    stock = build_preset(name, seed=123)
    assert set(model.state_dict()) == set(stock.state_dict())  # order may differ: weights re-registered last
    stock.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(run_preset(name, model), y)
    assert torch.equal(run_preset(name, stock), y)
    params = dict(stock.named_parameters())
    for fqn, mask in masks.items():
        assert (params[fqn][~mask] == 0).all()


def test_remove_keeps_dense_originals_of_an_nm_student(build_preset, run_preset):
    model = build_preset("tiny-unet")
    dense_y = run_preset("tiny-unet", model)
    before = _weights(model)
    p = plan(model, nm="2:4")
    inject(model, p)
    assert not torch.equal(run_preset("tiny-unet", model), dense_y)  # the projection is active
    for fqn, s in sites(model).items():
        assert torch.equal(s.original, before[fqn])  # N:M leaves W dense
    remove(model)
    assert _no_parametrizations(model) and get_plan(model) is None
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert torch.equal(run_preset("tiny-unet", model), dense_y)


def test_remove_keeps_stored_tensor_of_a_fixed_mask():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    inject(model, plan(model, sparsity=0.5, distribution="uniform"), init="random")
    stored = {}
    with torch.no_grad():
        for fqn, s in sites(model).items():
            s.original[~s.mask] = 7.0  # something only the stored tensor holds
            stored[fqn] = s.original.detach().clone()
    remove(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[f], t) for f, t in stored.items())


# ------------------------------------------------------------------------------------------- copies, state, dtype


@pytest.mark.parametrize("name", ["tiny-unet-cond", "tiny-dit"])
def test_deepcopy_keeps_masks_and_outputs(name, build_preset, run_preset):
    model = build_preset(name)
    inject(model, plan(model, sparsity=0.7), init="random", seed=2)
    y = run_preset(name, model)
    clone = copy.deepcopy(model)
    assert torch.equal(run_preset(name, clone), y)
    m0, m1 = _masks(model), _masks(clone)
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    # independent: changing the copy's mask leaves the original alone
    fqn, s = next(iter(sites(clone).items()))
    s.set_mask(~s.mask)
    assert torch.equal(sites(model)[fqn].mask, m0[fqn])
    assert not torch.equal(run_preset(name, clone), y)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_state_dict_round_trip_into_a_freshly_injected_model(name, build_preset, run_preset):
    src = build_preset(name, seed=0)
    p = plan(src, sparsity=0.7)
    inject(src, p, init="random", seed=1)
    y = run_preset(name, src)
    dst = build_preset(name, seed=1)
    inject(dst, plan(dst, sparsity=0.7), init="random", seed=2)
    assert not torch.equal(run_preset(name, dst), y)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(run_preset(name, dst), y)
    a, b = _masks(src), _masks(dst)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_conversion_keeps_masks_exact(dtype, build_preset, run_preset):
    model = build_preset("tiny-unet")
    inject(model, plan(model, sparsity=0.8, distribution="uniform"), init="random", seed=4)
    masks = _masks(model)
    y = run_preset("tiny-unet", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(dtype)
    for fqn, s in sites(model).items():
        assert s.mask.dtype == torch.bool and torch.equal(s.mask, masks[fqn])
        eff = s.effective()
        assert eff.dtype == dtype
        assert (eff[~s.mask] == 0).all() and int((eff != 0).sum()) <= int(masks[fqn].sum())
        assert torch.equal(eff, s.original * s.mask)
    out = run_preset("tiny-unet", model, dtype=dtype)
    tol = 1e-5 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(out.float(), y, rtol=tol, atol=tol)


def test_nm_masks_stay_valid_in_bfloat16():
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(8, 4, 3))
    inject(model, plan(model, nm="2:4"))
    model.to(torch.bfloat16)
    for s in sites(model).values():
        eff = s.effective()
        assert eff.dtype == torch.bfloat16
        assert ((_nhwc_groups(eff, 4) != 0).sum(dim=1) <= 2).all()
        assert (_nhwc_groups(s.mask, 4).sum(dim=1) == 2).all()


# ------------------------------------------------------------------------------------------- RNNs


class RNNNet(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.rnn = cls(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        return self.head(self.rnn(self.proj(x))[0])


def _dense_copy(model: RNNNet) -> RNNNet:
    """A plain module holding original ⊙ mask, built by hand from the stored tensors."""
    dense = RNNNet(type(model.rnn))
    ss = sites(model)
    with torch.no_grad():
        for fqn, p in dense.named_parameters():
            if fqn in ss:
                p.copy_(ss[fqn].original * ss[fqn].mask)
            else:
                p.copy_(dict(model.named_parameters())[fqn])
    return dense


@pytest.fixture(params=[nn.GRU, nn.LSTM], ids=["gru", "lstm"])
def masked_rnn(request):
    torch.manual_seed(0)
    model = RNNNet(request.param)
    inject(model, plan(model, sparsity=0.6, distribution="uniform"), init="random", seed=5)
    ss = sites(model)
    assert sum(1 for f in ss if f.startswith("rnn.")) == 8  # 2 layers × 2 directions × (ih, hh)
    for s in ss.values():  # the stored tensor holds the masked weights themselves
        assert (s.original[~s.mask] == 0).all() and (s.original[s.mask] != 0).all()
    return model


def test_rnn_forward_is_really_masked(masked_rnn):
    dense = _dense_copy(masked_rnn)
    x = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # repeated forwards: the cached flat weights must not leak the stored tensor
        torch.testing.assert_close(masked_rnn(x), dense(x), rtol=1e-5, atol=1e-6)
    masked_rnn.eval()
    dense.eval()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(masked_rnn(x), dense(x), rtol=1e-5, atol=1e-6)
    # a mask changed in place reaches the next forward (no cached flat weight keeps the old one)
    before = masked_rnn(x)
    site = sites(masked_rnn)["rnn.weight_hh_l0"]
    site.set_mask(site.mask & (torch.rand(site.mask.shape, generator=torch.Generator().manual_seed(3)) < 0.5))
    with torch.no_grad():
        torch.testing.assert_close(masked_rnn(x), _dense_copy(masked_rnn)(x), rtol=1e-5, atol=1e-6)
        assert (masked_rnn(x) - before).abs().max() > 1e-4


def test_rnn_gradients_reach_originals_only_at_kept(masked_rnn):
    dense = _dense_copy(masked_rnn)
    x = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(2))
    masked_rnn(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    dense_grads = {k: p.grad for k, p in dense.named_parameters()}
    for fqn, s in sites(masked_rnn).items():
        g = s.original.grad
        assert g is not None
        assert (g[~s.mask] == 0).all()
        assert (g[s.mask] != 0).float().mean() > 0.9, fqn
        torch.testing.assert_close(g, dense_grads[fqn] * s.mask, rtol=1e-4, atol=1e-6)


def test_rnn_deepcopy_and_fold_after_training_step(masked_rnn):
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(masked_rnn.parameters(), lr=0.1)
    masked_rnn(x).pow(2).sum().backward()
    opt.step()
    y = masked_rnn(x)
    clone = copy.deepcopy(masked_rnn)
    torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    expected = _dense_copy(masked_rnn)(x)
    fold(masked_rnn)
    assert _no_parametrizations(masked_rnn)
    assert isinstance(masked_rnn.rnn, (nn.GRU, nn.LSTM))
    torch.testing.assert_close(masked_rnn(x), expected, rtol=1e-5, atol=1e-6)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _copy_case(kind: str):
    torch.manual_seed(0)
    if kind == "conv+linear":
        return ConvNet(), torch.randn(2, 3, 5, 5)
    return RNNNet(nn.GRU if kind == "gru" else nn.LSTM), torch.randn(2, 5, 3)


@pytest.mark.parametrize("kind", ["conv+linear", "gru", "lstm"])
@pytest.mark.parametrize("action", ["fold", "remove", "fold-partly"])
def test_changing_a_deepcopy_leaves_the_original_working(kind, action):
    """Regression: copies shared torch's generated Parametrized<Class>, so folding a copy deleted the original's
    ``weight`` (AttributeError), and injecting into a copy gave the original a property it had no tensor for."""
    model, x = _copy_case(kind)
    p = plan(model, sparsity=0.5, distribution="uniform")
    # an RNN weight where there is one: the copy then parametrizes more tensors of that same module
    first = next((f for f in p.layers if f.startswith("rnn.")), next(iter(p.layers)))
    inject(model, Plan({first: p.layers[first]}) if action == "fold-partly" else p, init="random", seed=1)
    y, masks, state = model(x), _masks(model), {k: v.clone() for k, v in model.state_dict().items()}

    clone = copy.deepcopy(model)
    if action == "fold-partly":  # the copy gains masks on the module the original has parametrized, then folds
        inject(clone, Plan({f: lp for f, lp in p.layers.items() if f != first}), init="random", seed=2)
        assert len(sites(clone)) > len(sites(model)) == 1
    (remove if action == "remove" else fold)(clone)

    assert _no_parametrizations(clone)
    assert torch.equal(model(x), y)  # the original still runs, and computes what it did
    assert _masks(model).keys() == masks.keys() and all(torch.equal(_masks(model)[k], masks[k]) for k in masks)
    assert model.state_dict().keys() == state.keys() and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items()
    )
    fold(model)  # and can itself be folded afterwards
    assert torch.equal(model(x), y)
    torch.testing.assert_close(clone(x), y, rtol=0, atol=0) if action != "fold-partly" else clone(x)


def test_folding_the_original_leaves_its_copy_working():
    model, x = _copy_case("gru")
    inject(model, plan(model, sparsity=0.5), init="random", seed=1)
    clone = copy.deepcopy(model)
    y = clone(x)
    fold(model)
    assert sites(clone) and torch.equal(clone(x), y)
    copy.deepcopy(clone)  # a copy of a copy is a copy too
    fold(clone)
    assert torch.equal(clone(x), y)


# ------------------------------------------------------------------------------------------- N:M plans


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)  # in = 6: skip
        self.b = nn.Linear(8, 6)  # in = 8: ok (out does not matter)
        self.c = nn.Conv2d(3, 8, 3)  # in = 3: skip
        self.d = nn.Conv2d(2, 8, 2)  # in = 2: skip, although in·kh·kw = 8 is divisible by 4
        self.e = nn.Conv2d(8, 4, 3)  # ok
        self.f = nn.Conv1d(12, 4, 5)  # ok
        self.g = nn.GRU(6, 8)  # weight_ih [24, 6]: skip; weight_hh [24, 8]: ok


def test_nm_plan_skips_non_divisible_reduction_with_reasons():
    model = Mixed()
    p = plan(model, nm="2:4")
    assert set(p.skipped) == {"a.weight", "c.weight", "d.weight", "g.weight_ih_l0"}
    assert set(p.layers) == {"b.weight", "e.weight", "f.weight", "g.weight_hh_l0"}
    for reason in p.skipped.values():
        assert isinstance(reason, str) and "4" in reason
    assert all(lp.nm == (2, 4) for lp in p.layers.values())
    before = _weights(model)
    inject(model, p, lambda_w=1e-3)
    ss = sites(model)
    assert set(ss) == set(p.layers)
    for fqn in p.skipped:
        module_name, _, tname = fqn.rpartition(".")
        assert not parametrize.is_parametrized(model.get_submodule(module_name), tname)
    for fqn, s in ss.items():
        assert isinstance(s.parametrization, NMMask) and s.parametrization.lambda_w == 1e-3
        eff = s.effective()
        assert ((_nhwc_groups(eff, 4) != 0).sum(dim=1) == 2).all()
        mag = _nhwc_groups(before[fqn].abs(), 4)
        keep = _nhwc_groups(eff != 0, 4)
        kept_min = torch.where(keep, mag, torch.inf).min(dim=1).values
        dropped_max = torch.where(keep, -torch.inf, mag).max(dim=1).values
        assert (kept_min >= dropped_max).all()
        assert torch.equal(s.mask, eff != 0)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_nm_plan_on_presets(name, build_preset):
    model = build_preset(name)
    p = plan(model, nm="2:4")
    from surgeon.masking.targets import find_targets

    every = find_targets(model)
    assert set(p.layers) | set(p.skipped) == set(every) and not set(p.layers) & set(p.skipped)
    assert all(every[f].shape[1] % 4 for f in p.skipped)
    assert all(every[f].shape[1] % 4 == 0 for f in p.layers)
    inject(model, p)
    for s in sites(model).values():
        assert (_nhwc_groups(s.mask, 4).sum(dim=1) == 2).all()


# ------------------------------------------------------------------------------------------- sites


def test_site_set_mask_and_nm_refusal():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    inject(model, plan(model, sparsity=0.5, distribution="uniform"), init="random")
    s = sites(model)["0.weight"]
    new = torch.zeros(4, 8, dtype=torch.bool)
    new[:, :2] = True
    s.set_mask(new)
    assert torch.equal(s.mask, new)
    assert (s.effective()[:, 2:] == 0).all()
    nm_model = nn.Linear(8, 4)
    inject(nm_model, plan(nm_model, nm="1:4"))
    nm_site = sites(nm_model)["weight"]
    assert nm_site.is_nm and not s.is_nm
    with pytest.raises(TypeError):
        nm_site.set_mask(torch.ones(4, 8, dtype=torch.bool))
    assert torch.equal(nm_site.mask, nm_site.effective() != 0)


def test_fold_bakes_the_nm_projection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Conv2d(8, 4, 3))
    inject(model, plan(model, nm="2:4"))
    effective = {fqn: s.effective().detach().clone() for fqn, s in sites(model).items()}
    fold(model)
    assert _no_parametrizations(model)
    params = dict(model.named_parameters())
    for fqn, eff in effective.items():
        assert torch.equal(params[fqn], eff)
        assert ((_nhwc_groups(params[fqn], 4) != 0).sum(dim=1) == 2).all()


def test_nm_gru_forward_uses_the_projection():
    torch.manual_seed(0)
    gru = nn.GRU(8, 4, num_layers=2, bidirectional=True, batch_first=True)
    p = plan(gru, nm="2:4")
    assert set(p.layers) == {n for n, _ in gru.named_parameters() if n.startswith("weight")}
    inject(gru, p)
    dense = nn.GRU(8, 4, num_layers=2, bidirectional=True, batch_first=True)
    ss = sites(gru)
    with torch.no_grad():
        for name, prm in dense.named_parameters():
            prm.copy_(ss[name].effective() if name in ss else getattr(gru, name))
            if name in ss:
                assert (_nhwc_groups(prm, 4) != 0).sum(dim=1).eq(2).all()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        torch.testing.assert_close(gru(x)[0], dense(x)[0], rtol=1e-5, atol=1e-6)
    gru(x)[0].sum().backward()
    assert all((s.original.grad[~s.mask] != 0).any() for s in ss.values())  # straight through: pruned W trains


# ------------------------------------------------------------------------------------------- adopting given masks


def _given_masks(model: nn.Module, p: Plan) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {fqn: torch.rand(lp.shape, generator=g) < 0.5 for fqn, lp in p.layers.items() if not lp.is_dense}


def test_given_masks_are_copied_unless_adopted():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    p = plan(model, sparsity=0.5, distribution="uniform")
    given = _given_masks(model, p)
    inject(model, p, masks=given)
    for fqn, s in sites(model).items():
        assert torch.equal(s.mask, given[fqn]) and s.mask.data_ptr() != given[fqn].data_ptr()
        assert (s.original[~s.mask] == 0).all()  # inject zeroed what the mask prunes
    adopted = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():  # a loader's contract: the weights are already 0 wherever the mask prunes
        for fqn, m in given.items():
            adopted.get_parameter(fqn).mul_(m)
    inject(adopted, p, masks=given, adopt=True)
    for fqn, s in sites(adopted).items():
        assert s.mask.data_ptr() == given[fqn].data_ptr()


def test_adopting_trusts_the_weights_and_a_fresh_inject_does_not():
    # adopt skips the zeroing a loader has already done: a weight left nonzero where pruned stays so, which is why
    # only a reader that has just written the weights may pass it (the default path zeroes, tested above)
    model = nn.Sequential(nn.Linear(8, 8))
    p = plan(model, sparsity=0.5, distribution="uniform")
    given = _given_masks(model, p)
    inject(model, p, masks=given, adopt=True)
    s = sites(model)["0.weight"]
    assert bool((s.original[~s.mask] != 0).any())
