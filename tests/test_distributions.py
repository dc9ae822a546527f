"""Layer budgets (docs/methods.md, "Methods"): uniform, ER, ERK with saturation and re-solve, overrides, argument checks."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.masking.plan import LayerPlan, Plan, plan
from surgeon.sparsity.distributions import layer_densities

FAST = settings(max_examples=50, deadline=None, derandomize=True)

dim = st.integers(1, 64)
small = st.integers(1, 24)
kern = st.integers(1, 5)
layer_shape = st.one_of(
    st.tuples(dim, dim),  # linear [out, in]
    st.tuples(small, small, kern),  # conv1d [out, in, k]
    st.tuples(small, small, kern, kern),  # conv2d [out, in, kh, kw]
)
shape_sets = st.lists(layer_shape, min_size=1, max_size=6).map(lambda ls: {f"l{i}": s for i, s in enumerate(ls)})
sparsities = st.floats(0.0, 0.95, allow_nan=False)
DISTS = ("uniform", "er", "erk")


def raw_score(shape, distribution: str, power_scale: float = 1.0) -> float:
    """The papers' formulas written out: n_out = shape[0], n_in = shape[1], kernel = shape[2:]."""
    n_out, n_in, kernel = shape[0], shape[1], shape[2:]
    if distribution == "uniform":
        return 1.0
    if distribution == "er":  # Erdős–Rényi: kernel sizes play no part
        return (n_in + n_out) / (n_in * n_out)
    num = n_in + n_out + sum(kernel)
    den = n_in * n_out * math.prod(kernel)
    return (num / den) ** power_scale


def kept(shapes, dens) -> int:
    return sum(LayerPlan("linear", tuple(shapes[n]), density=dens[n]).kept for n in shapes)


def total(shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def check_solution(shapes, dens, sparsity, distribution, power_scale=1.0, overrides=None):
    overrides = overrides or {}
    assert set(dens) == set(shapes)
    for n, d in dens.items():
        assert 0.0 <= d <= 1.0, (n, d)
    for n, d in overrides.items():
        assert dens[n] == d
    # the realized kept count meets the global budget within one weight per layer
    assert abs(kept(shapes, dens) - (1 - sparsity) * total(shapes)) <= len(shapes)
    free = [n for n in shapes if n not in overrides]
    raw = {n: raw_score(shapes[n], distribution, power_scale) for n in free}
    open_ = [n for n in free if dens[n] < 1.0]
    # densities of non-saturated layers are ε · raw score: equal ratios
    for a in open_:
        for b in open_:
            assert dens[a] / dens[b] == pytest.approx(raw[a] / raw[b], rel=1e-9)
    # a layer is made dense only when ε · raw would exceed 1 (ε from the final solve)
    if open_:
        eps = dens[open_[0]] / raw[open_[0]]
        for n in free:
            if dens[n] == 1.0:
                assert eps * raw[n] >= 1.0 - 1e-9, n


@FAST
@given(shape_sets, sparsities, st.sampled_from(DISTS))
def test_budget_ratios_and_saturation(shapes, sparsity, distribution):
    dens = layer_densities(shapes, sparsity, distribution)
    check_solution(shapes, dens, sparsity, distribution)
    if distribution == "uniform":
        assert all(d == pytest.approx(1 - sparsity, abs=1e-12) for d in dens.values())


@FAST
@given(shape_sets, sparsities, st.floats(0.0, 2.0, allow_nan=False))
def test_erk_power_scale_honored(shapes, sparsity, power_scale):
    dens = layer_densities(shapes, sparsity, "erk", power_scale=power_scale)
    check_solution(shapes, dens, sparsity, "erk", power_scale)


@FAST
@given(shape_sets, sparsities, st.sampled_from(DISTS), st.data())
def test_overrides_are_pinned_and_the_rest_share_the_budget(shapes, sparsity, distribution, data):
    names = sorted(shapes)
    pinned = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    overrides = {n: data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])) for n in pinned}
    rhs = (1 - sparsity) * total(shapes) - sum(overrides[n] * math.prod(shapes[n]) for n in overrides)
    room = sum(math.prod(shapes[n]) for n in names if n not in overrides)
    if rhs < -0.5 or rhs > room + 0.5:  # infeasible: more than the budget pinned, or too little left to fill it
        with pytest.raises(SurgeonError):
            layer_densities(shapes, sparsity, distribution, overrides=overrides)
        return
    dens = layer_densities(shapes, sparsity, distribution, overrides=overrides)
    check_solution(shapes, dens, sparsity, distribution, overrides=overrides)


def test_erk_saturation_by_hand():
    shapes = {"small": (2, 2), "big": (64, 64)}
    # raw: small (2+2)/(2·2) = 1, big 128/4096. ε = 2050/(4 + 128) ≫ 1 → small is made dense and the big
    # layer keeps the rest: (0.5·4100 − 4)/4096
    dens = layer_densities(shapes, 0.5, "erk")
    assert dens["small"] == 1.0
    assert dens["big"] == pytest.approx((0.5 * 4100 - 4) / 4096, rel=1e-12)


def test_erk_two_rounds_of_saturation_by_hand():
    shapes = {"a": (1, 1), "b": (4, 4), "c": (100, 100)}
    # raw a = 2, b = 0.5, c = 0.02. Budget at S=0.5: 0.5·10017 = 5008.5 weights.
    # round 1: ε = 5008.5/(2 + 8 + 200) ≈ 23.85 → ε·2 > 1, a dense.
    # round 2: ε = 5007.5/(8 + 200) ≈ 24.07 → ε·0.5 > 1, b dense.
    # round 3: ε = 4991.5/200 → c density = ε·0.02 = 4991.5/10000 < 1.
    dens = layer_densities(shapes, 0.5, "erk")
    assert dens["a"] == 1.0 and dens["b"] == 1.0
    assert dens["c"] == pytest.approx(4991.5 / 10000, rel=1e-12)


def test_er_ignores_kernel_sizes_and_erk_does_not():
    shapes = {"k3": (16, 16, 3, 3), "k1": (16, 16, 1, 1), "lin": (64, 128)}
    er = layer_densities(shapes, 0.8, "er")
    assert er["k3"] == pytest.approx(er["k1"], rel=1e-12)
    assert er["k3"] / er["lin"] == pytest.approx((32 / 256) / (192 / (64 * 128)), rel=1e-9)
    erk = layer_densities(shapes, 0.95, "erk")  # at 0.8 the 1x1 conv saturates
    assert erk["k1"] < 1.0
    assert erk["k1"] / erk["k3"] == pytest.approx((34 / 256) / (38 / (256 * 9)), rel=1e-9)


def test_power_scale_zero_is_uniform_and_half_is_square_root():
    shapes = {"a": (32, 32, 3, 3), "b": (64, 32, 3, 3), "c": (128, 64)}
    flat = layer_densities(shapes, 0.7, "erk", power_scale=0.0)
    assert all(d == pytest.approx(0.3, rel=1e-12) for d in flat.values())
    half = layer_densities(shapes, 0.9, "erk", power_scale=0.5)
    full = layer_densities(shapes, 0.9, "erk", power_scale=1.0)
    assert half["a"] / half["c"] == pytest.approx(math.sqrt(full["a"] / full["c"]), rel=1e-9)


def test_uniform_with_override_re_solves_the_rest():
    shapes = {"a": (10, 10), "b": (10, 30)}
    dens = layer_densities(shapes, 0.5, "uniform", overrides={"a": 1.0})
    assert dens["a"] == 1.0
    assert dens["b"] == pytest.approx((0.5 * 400 - 100) / 300, rel=1e-12)


@pytest.mark.parametrize("distribution", DISTS)
def test_infeasible_overrides_raise(distribution):
    shapes = {"a": (10, 10), "b": (10, 10)}
    with pytest.raises(SurgeonError):  # pinned layers alone exceed the budget
        layer_densities(shapes, 0.9, distribution, overrides={"a": 1.0})
    with pytest.raises(SurgeonError):  # b cannot hold 180 weights
        layer_densities(shapes, 0.1, distribution, overrides={"a": 0.0})


@pytest.mark.parametrize("distribution", DISTS)
def test_sparsity_zero_is_all_dense(distribution):
    shapes = {"a": (3, 5), "b": (8, 8, 3, 3), "c": (2, 7, 4)}
    dens = layer_densities(shapes, 0.0, distribution)
    assert kept(shapes, dens) == total(shapes)
    assert all(d <= 1.0 for d in dens.values())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.2, float("nan"), float("inf"), "0.5", None])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    shapes = {"a": (4, 4)}
    with pytest.raises(SurgeonError):
        layer_densities(shapes, bad, "erk")
    if bad is not None:
        with pytest.raises(SurgeonError):
            plan(nn.Linear(4, 4), sparsity=bad)


def test_unknown_distribution_and_bad_overrides_are_rejected():
    shapes = {"a": (4, 4), "b": (4, 8)}
    with pytest.raises(SurgeonError):
        layer_densities(shapes, 0.5, "gaussian")
    with pytest.raises(SurgeonError):
        plan(nn.Linear(4, 4), sparsity=0.5, distribution="ERK!")
    with pytest.raises(SurgeonError):
        layer_densities(shapes, 0.5, "erk", overrides={"nope": 1.0})
    with pytest.raises(SurgeonError):
        layer_densities(shapes, 0.5, "erk", overrides={"a": 1.5})
    with pytest.raises(SurgeonError):
        layer_densities(shapes, 0.5, "erk", overrides={"a": -0.5})


def test_plan_requires_exactly_one_of_sparsity_and_nm():
    model = nn.Linear(8, 8)
    with pytest.raises(SurgeonError):
        plan(model)
    with pytest.raises(SurgeonError):
        plan(model, sparsity=0.5, nm="2:4")


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_plan_on_a_preset_meets_the_budget_and_round_trips(build_preset, distribution, sparsity):
    model = build_preset("tiny-unet")
    p = plan(model, sparsity=sparsity, distribution=distribution, dense_first=True)
    assert "conv_in.weight" not in p.layers
    assert abs(p.kept - (1 - sparsity) * p.total) <= len(p.layers)
    assert p.total == sum(math.prod(lp.shape) for lp in p.layers.values())
    for lp in p.layers.values():
        assert 0 <= lp.kept <= lp.numel and lp.nm is None
    back = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back.layers == p.layers and back.sparsity == p.sparsity and back.distribution == distribution


def test_plan_overrides_reach_the_layers(build_preset):
    model = build_preset("tiny-unet")
    p = plan(model, sparsity=0.8, distribution="erk", overrides={"conv_out.weight": 1.0, "conv_in.weight": 0.5})
    assert p.layers["conv_out.weight"].is_dense
    assert p.layers["conv_in.weight"].density == 0.5
    assert abs(p.kept - 0.2 * p.total) <= len(p.layers)


def test_layerplan_kept_is_exact():
    assert LayerPlan("linear", (10, 10), density=0.25).kept == 25
    assert LayerPlan("linear", (10, 10), density=1e-6).kept == 1  # never zero for a positive density
    assert LayerPlan("linear", (10, 10), density=0.0).kept == 0
    assert LayerPlan("linear", (10, 10), density=1.0).is_dense
    assert LayerPlan("linear", (6, 8), nm=(2, 4)).kept == 24
    assert not LayerPlan("linear", (6, 8), nm=(4, 4)).is_dense  # N:M layers always carry a parametrization


def test_malformed_plan_dict_is_a_surgeon_error():
    with pytest.raises(SurgeonError):
        Plan.from_dict({"layers": {"a": {"shape": [2, 2]}}})
    with pytest.raises(SurgeonError):
        Plan.from_dict({})
