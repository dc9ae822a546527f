"""measure(): kept parameters, sparsity and FLOPs (Evci et al.) against hand-computed counts."""

import pytest
import torch
from torch import nn

import surgeon
from surgeon.evaluation.tables import format_flops
from surgeon.masking.measure import measure


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)
    )


CONV = 2 * (3 * 3 * 3) * 5 * (6 * 6)  # 2 FLOPs per multiply-accumulate, one per output element and kernel tap
LIN1 = 2 * (5 * 6 * 6) * 16
LIN2 = 2 * 16 * 4


def test_dense_flops_equal_the_hand_count():
    m = measure(_model(), torch.randn(1, 3, 6, 6))
    assert m.flops_dense == CONV + LIN1 + LIN2
    assert {r.name: r.flops for r in m.layers} == {"0.weight": CONV, "3.weight": LIN1, "5.weight": LIN2}
    assert m.flops_sparse == m.flops_dense and m.sparsity == 0.0
    assert m.params_kept == m.params_total == sum(p.numel() for p in _model().parameters())
    assert m.input_shapes == {"input": [1, 3, 6, 6]}


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_sparse_flops_scale_with_each_layers_density(s):
    model = _model()
    surgeon.inject(model, surgeon.plan(model, sparsity=s, distribution="uniform"))
    m = measure(model, torch.randn(1, 3, 6, 6))
    dens = {r.name: r.density for r in m.layers}
    assert m.flops_sparse == pytest.approx(CONV * dens["0.weight"] + LIN1 * dens["3.weight"] + LIN2 * dens["5.weight"])
    assert m.flops_sparse / m.flops_dense == pytest.approx(1 - s, abs=0.01)
    assert m.sparsity == pytest.approx(s, abs=0.01)
    pruned = sum(r.numel - r.kept for r in m.layers)
    assert m.params_kept == m.params_total - pruned and pruned > 0


def test_training_flops_per_algorithm():
    model = _model()
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5, distribution="uniform"))
    m = measure(model, torch.randn(1, 3, 6, 6))
    f_d, f_s = m.flops_dense, m.flops_sparse
    assert m.training_flops("dense") == 3 * f_d
    assert m.training_flops("static") == m.training_flops("magran") == 3 * f_s
    assert m.training_flops("rigl", 100) == pytest.approx((3 * f_s * 100 + 2 * f_s + f_d) / 101)
    assert 3 * f_s < m.training_flops("rigl", 10) < m.training_flops("rigl", 1) < 3 * f_d


def test_plain_tensors_count_their_nonzeros_and_no_input_means_no_flops():
    model = _model()
    with torch.no_grad():
        model[5].weight[:, :8] = 0  # half of the last layer, e.g. a folded export
    m = measure(model)
    assert {r.name: r.kept for r in m.layers}["5.weight"] == 32
    assert m.flops_dense is None and m.flops_sparse is None and m.training_flops("dense") is None


def test_gru_flops_are_counted_and_shared_by_size():
    torch.manual_seed(0)
    gru = nn.GRU(4, 8, batch_first=True)
    m = measure(gru, torch.randn(1, 10, 4))
    rows = {r.name: r.flops for r in m.layers}
    assert rows["weight_ih_l0"] == pytest.approx(2 * 10 * 4 * 24, rel=0.05)  # 3 gates × hidden 8, 10 steps
    assert rows["weight_hh_l0"] == pytest.approx(2 * 10 * 8 * 24, rel=0.05)


def test_format_flops():
    assert format_flops(1.5e9) == "1.50G" and format_flops(None) == "n/a" and format_flops(12) == "12"


def test_run_flops_of_a_recipe_add_the_distillation_teacher():
    from surgeon.recipe import load_recipe

    model = _model()
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5, distribution="uniform"))
    m = measure(model, torch.randn(1, 3, 6, 6))
    rigl = load_recipe("rigl").override(**{"training.steps": 10, "training.batch_size": 4, "dst.delta_t": 5})
    assert m.run_flops(rigl) == pytest.approx(m.training_flops("rigl", 5) * 4 * 10)
    sparsedm = load_recipe("sparsedm")
    t = sparsedm.training
    expected = (m.training_flops(sparsedm.algorithm) + m.flops_dense) * t.batch_size * t.grad_accum * 3
    assert sparsedm.distill is not None and m.run_flops(sparsedm, steps=3) == pytest.approx(expected)
