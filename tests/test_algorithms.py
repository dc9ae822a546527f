"""Static, MagRan and RigL (Algorithm 1 and 2 of the paper) against the invariants of docs/methods.md.

Loop-level tests run the real ``surgeon.training.loop.train`` loop with a probe wrapped around the algorithm's hooks, so
what is checked is what the loop actually does at every mask update (optimizer and EMA fix-ups included).
Hook-level tests drive RigL/MagRan directly on a tiny Linear layer whose weights and gradients are set by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from helpers_train import SyntheticImageTask, masks_of, one_thread, small_recipe, tiny_model  # noqa: F401
from torch import nn

import surgeon.training.loop as train_mod
from surgeon.algorithms import ALGORITHMS, MagRan, RigL
from surgeon.errors import SurgeonError
from surgeon.masking.plan import plan
from surgeon.masking.surgery import get_plan, inject, sites
from surgeon.recipe import load_recipe
from surgeon.training.loop import train, zero_optimizer_state


# --------------------------------------------------------------------------------------------- loop-level probe
class Probe:
    """Wraps the loop's optimizer, EMA and algorithm to record and check the state around every mask update."""

    def __init__(self, monkeypatch, algorithm: str):
        self.optimizer = None
        self.ema = None
        self.updates: list[dict] = []
        self.checked: list[int] = []
        probe = self
        real_make_optimizer, real_ema = train_mod.make_optimizer, train_mod.EMA

        def make_optimizer(model, recipe):
            opt, names = real_make_optimizer(model, recipe)
            probe.optimizer = opt
            return opt, names

        class RecordingEMA(real_ema):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                probe.ema = self

        base = ALGORITHMS[algorithm]

        class Probing(base):
            def begin_step(self, step):
                # the previous step's update has now been fully applied by the loop (optimizer + EMA fix-ups)
                if probe.updates and probe.updates[-1]["step"] == step - 1:
                    probe.check(self, probe.updates[-1])
                super().begin_step(step)

            def after_optimizer_step(self, step):
                before = {f: s.mask.clone() for f, s in self.sites.items()}
                weights = {f: s.original.detach().clone() for f, s in self.sites.items()}
                moments = {
                    f: {k: v.clone() for k, v in probe.optimizer.state[s.original].items() if torch.is_tensor(v)}
                    for f, s in self.sites.items()
                }
                resets = super().after_optimizer_step(step)
                if resets:
                    probe.updates.append(
                        {
                            "step": step,
                            "before": before,
                            "weights": weights,
                            "moments": moments,
                            "after": {f: s.mask.clone() for f, s in self.sites.items()},
                            "resets": {f: r.clone() for f, r in resets.items()},
                        }
                    )
                return resets

        monkeypatch.setattr(train_mod, "make_optimizer", make_optimizer)
        monkeypatch.setattr(train_mod, "EMA", RecordingEMA)
        monkeypatch.setitem(ALGORITHMS, algorithm, Probing)

    def check(self, algo, u: dict) -> None:
        model = algo.model
        planned = get_plan(model)
        name_of = {id(p): n for n, p in model.named_parameters()}
        moved = 0
        for fqn, site in algo.sites.items():
            before, after, reset = u["before"][fqn], u["after"][fqn], u["resets"][fqn]
            mask = site.mask
            assert torch.equal(mask, after)
            # exact per-layer count: the planned top-k count, before and after the update
            assert int(before.sum()) == int(after.sum()) == planned.layers[fqn].kept, fqn
            w = site.original.detach()
            assert torch.all(w[~mask] == 0), f"{fqn}: pruned original weights are not exactly 0"
            assert torch.all(site.effective().detach()[~mask] == 0), f"{fqn}: pruned effective weights are not 0"
            dropped, grown = before & ~after, after & ~before
            assert not torch.any(dropped & ~reset) and not torch.any(grown & ~reset)
            assert torch.all(w[reset & after] == 0), f"{fqn}: grown weights must start at 0"
            survivors = after & ~reset
            assert torch.equal(w[survivors], u["weights"][fqn][survivors]), f"{fqn}: kept weights changed"
            for key in ("exp_avg", "exp_avg_sq"):
                state = self.optimizer.state[site.original][key]
                assert torch.all(state[reset] == 0), f"{fqn}: {key} not zeroed at reset positions"
                assert torch.all(state[~mask] == 0), f"{fqn}: {key} nonzero at a pruned position"
                # untouched positions keep their moments
                assert torch.equal(state[~reset], u["moments"][fqn][key][~reset])
            if self.ema is not None:
                shadow = self.ema.shadow[name_of[id(site.original)]]
                assert torch.all(shadow[reset] == 0), f"{fqn}: EMA shadow not 0 at reset positions"
            moved += int(dropped.sum())
        assert moved > 0, "the update moved no weight"
        # the zeroing was real: active weights that were dropped had nonzero second moments before the update
        had = sum(int((u["moments"][f]["exp_avg_sq"][u["before"][f] & ~u["after"][f]] != 0).sum()) for f in algo.sites)
        assert had > 0
        self.checked.append(u["step"])


@pytest.mark.parametrize("algorithm", ["rigl", "magran"])
def test_masks_moments_and_ema_exact_through_three_updates(monkeypatch, tmp_path, algorithm):
    probe = Probe(monkeypatch, algorithm)
    recipe = small_recipe(algorithm, **{"training.steps": 10, "dst.delta_t": 3, "training.ema_decay": 0.9})
    model = tiny_model(recipe)
    start = masks_of(model)
    result = train(model, SyntheticImageTask(model), recipe, tmp_path, progress=False)
    assert [u["step"] for u in result.mask_updates] == [3, 6, 9]
    assert probe.checked == [3, 6, 9]  # every update was checked after the loop applied its fix-ups
    assert probe.ema is not None
    end = masks_of(model)
    assert any(not torch.equal(start[f], end[f]) for f in start)


def test_static_masks_never_change(tmp_path):
    recipe = small_recipe("static", **{"training.steps": 6})
    model = tiny_model(recipe)
    start = masks_of(model)
    weights = {f: s.original.detach().clone() for f, s in sites(model).items()}
    result = train(model, SyntheticImageTask(model), recipe, tmp_path, progress=False)
    assert result.steps == 6 and result.mask_updates == []
    for fqn, site in sites(model).items():
        assert torch.equal(site.mask, start[fqn])
        assert torch.all(site.original.detach()[~site.mask] == 0)
        assert not torch.equal(site.original.detach(), weights[fqn])  # it did train


# ---------------------------------------------------------------------------------------- hook-level, by hand
def reference_update(w: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, n: int):
    """Algorithm 2 in plain Python: drop the n smallest |w| among active, grow the n largest scores outside the kept set
    (ties broken towards the lower flat index, as the library documents)."""
    wl, ml, sl = w.flatten().tolist(), mask.flatten().tolist(), scores.flatten().tolist()
    active = [i for i, m in enumerate(ml) if m]
    by_mag = sorted(active, key=lambda i: (abs(wl[i]), -i))  # ascending |w|; the higher index drops first on ties
    dropped = set(by_mag[:n])
    kept = set(active) - dropped
    candidates = [i for i in range(len(ml)) if i not in kept]
    grown = set(sorted(candidates, key=lambda i: (-sl[i], i))[:n])
    return kept, dropped, grown


def _layer(out_f: int, in_f: int, mask: torch.Tensor) -> tuple[nn.Module, object]:
    mask = mask.clone()
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    p = plan(model, sparsity=1 - float(mask.float().mean()), distribution="uniform")
    inject(model, p, masks={"0.weight": mask})
    return model, sites(model)["0.weight"]


def _dst_recipe(algorithm: str, p: float, seed: int = 0):
    return load_recipe(algorithm).override(
        **{"dst.delta_t": 1, "dst.p": p, "dst.p_decay": "constant", "dst.stop_fraction": 1.0, "training.seed": seed}
    )


@pytest.mark.parametrize("p", [0.5, 0.01])  # 0.01: no weight moves (n = 0), so none is captured
def test_rigl_capture_step_ends_as_if_the_optimizer_had_seen_the_masked_gradient(p):
    # At a capture step AdamW steps on the whole gradient (no copy of it is made); after the mask update and the
    # loop's resets, weights and moments must equal a step on the masked gradient wherever a weight stays active,
    # and be exactly 0 everywhere else.
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(8, 12, generator=g) < 0.5
    model, site = _layer(8, 12, mask)
    with torch.no_grad():
        site.original.copy_(torch.randn(8, 12, generator=g) * mask)
    reference = site.original.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([site.original], lr=0.1, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.1)
    x = torch.randn(6, 12, generator=g)

    def backward_both() -> None:
        (model(x) ** 2).sum().backward()
        (torch.nn.functional.linear(x, reference) ** 2).sum().backward()
        reference.grad *= site.mask  # what the optimizer used to see: the masked gradient

    def step_both() -> None:
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)

    backward_both()  # an ordinary masked step first, so that the moments are nonzero at the capture step
    step_both()
    algo = RigL(_dst_recipe("rigl", p=p), total_steps=10)
    algo.setup(model, Accelerator(cpu=True))
    algo.begin_step(1)
    backward_both()
    algo.after_backward(1)
    step_both()
    before = site.mask.clone()
    resets = algo.after_optimizer_step(1)
    for fqn, positions in resets.items():
        zero_optimizer_state(opt, algo.sites[fqn].original, positions)
    after = site.mask
    stayed = before & after
    state, ref_state = opt.state[site.original], ref_opt.state[reference]
    assert torch.equal(site.original.detach()[stayed], reference.detach()[stayed])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][stayed], ref_state[key][stayed]), key
        assert bool((state[key][~stayed] == 0).all()), key
    assert bool((site.original.detach()[~after] == 0).all())
    assert bool((site.original.detach()[after & ~before] == 0).all())  # grown: start at 0
    if p == 0.01:  # nothing moves: nothing was captured, the optimizer saw the masked gradient, nothing to reset
        assert resets == {} and torch.equal(before, after)
    else:
        assert torch.equal(resets["0.weight"], ~stayed)


def _as_set(t: torch.Tensor) -> set[int]:
    return set(torch.nonzero(t.flatten()).flatten().tolist())


def test_rigl_grows_top_dense_gradient_from_a_real_backward():
    g = torch.Generator().manual_seed(3)
    out_f, in_f = 4, 6
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[torch.randperm(out_f * in_f, generator=g)[:12]] = True
    mask = mask.view(out_f, in_f)
    model, site = _layer(out_f, in_f, mask)
    w = torch.randn(out_f, in_f, generator=g)
    with torch.no_grad():
        site.original.copy_(w * mask)
    x = torch.randn(5, in_f, generator=g)
    c = torch.randn(5, out_f, generator=g)
    expected_grad = c.T @ x  # d/dW_eff of sum(c * (x @ W_eff.T)), at every position, pruned ones included

    algo = RigL(_dst_recipe("rigl", p=0.25), total_steps=10)
    algo.setup(model, Accelerator(cpu=True))
    algo.begin_step(1)
    (model(x) * c).sum().backward()
    algo.after_backward(1)
    dense = site.parametrization.dense_grad
    assert torch.allclose(dense, expected_grad, atol=1e-5)
    assert dense.data_ptr() == site.original.grad.data_ptr()  # the gradient itself, whole: no copy
    with pytest.raises(SurgeonError, match="zero_grad"):  # still the parameter's .grad: a zero_grad would zero it
        algo.after_optimizer_step(1)
    site.original.grad = None  # the loop's zero_grad(set_to_none=True), here with no optimizer step between
    before_w = site.original.detach().clone()
    resets = algo.after_optimizer_step(1)

    n = int(0.25 * 12)
    kept, dropped, grown = reference_update(before_w, mask, expected_grad.abs(), n)
    assert grown & {i for i, m in enumerate(mask.flatten().tolist()) if not m}, "example should grow a pruned position"
    new = site.mask
    assert _as_set(new) == kept | grown
    old = _as_set(mask)
    # every position not active both before and after: truly dropped, truly new, and the pruned ones
    assert _as_set(resets["0.weight"]) == set(range(out_f * in_f)) - (old & (kept | grown))
    assert int(new.sum()) == 12
    flat = site.original.detach().flatten()
    assert all(flat[i] == 0 for i in grown - old)
    assert all(flat[i] == before_w.flatten()[i] for i in kept | (grown & old))
    assert site.parametrization.dense_grad is None and not site.parametrization.capture_grad
    assert algo.history == [{"step": 1, "p": 0.25, "regrown": len(grown - _as_set(mask))}]


def test_rigl_on_hand_written_weights_and_gradient():
    # W (3x4), active where nonzero. |w| order among active: 0.1 < 0.2 < 0.5 < 0.7 < 0.9 < 3.0 < ...
    w = torch.tensor([[0.5, 0.0, -0.1, 0.0], [0.0, 3.0, 0.0, -0.7], [0.2, 0.0, 0.9, 0.0]])
    mask = w != 0
    # dense gradient: the largest |g| sit at pruned (0,1), (2,3) and at the just-dropped (0,2)
    grad = torch.tensor([[0.01, -5.0, 4.0, 0.02], [0.03, 0.04, 0.05, 0.06], [0.07, 0.08, 0.09, 3.0]])
    model, site = _layer(3, 4, mask)
    with torch.no_grad():
        site.original.copy_(w)
    algo = RigL(_dst_recipe("rigl", p=0.5), total_steps=10)  # k = 6, n = 3
    algo.setup(model, Accelerator(cpu=True))
    algo.begin_step(2)
    site.parametrization.dense_grad = grad.clone()
    algo.after_backward(2)
    algo.after_optimizer_step(2)
    # drop the 3 smallest |w|: -0.1 (0,2), 0.2 (2,0), 0.5 (0,0); grow the 3 largest |g| outside the kept
    # {(1,1), (1,3), (2,2)}: -5.0 (0,1), 4.0 (0,2) (dropped and grown back: keeps -0.1), 3.0 (2,3)
    expected = torch.tensor([[False, True, True, False], [False, True, False, True], [False, False, True, True]])
    assert torch.equal(site.mask, expected)
    assert torch.equal(
        site.original.detach(), torch.tensor([[0.0, 0.0, -0.1, 0.0], [0.0, 3.0, 0.0, -0.7], [0.0, 0.0, 0.9, 0.0]])
    )
    kept, dropped, grown = reference_update(w, mask, grad.abs(), 3)
    assert _as_set(site.mask) == kept | grown


def _chi2_sf(x: float, df: int) -> float:
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64))
    )


def test_magran_grows_uniformly_among_inactive_positions():
    out_f, in_f, k, p = 4, 8, 16, 0.25
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[torch.randperm(out_f * in_f, generator=g)[:k]] = True
    mask = mask.view(out_f, in_f)
    w0 = (torch.randperm(out_f * in_f, generator=g).float() + 1).view(out_f, in_f) * mask  # distinct magnitudes
    model, site = _layer(out_f, in_f, mask)
    trials = 3000
    algo = MagRan(_dst_recipe("magran", p=p, seed=5), total_steps=trials)
    algo.setup(model, Accelerator(cpu=True))
    n = int(p * k)
    kept, dropped, _ = reference_update(w0, mask, torch.zeros_like(w0), n)
    candidates = sorted(set(range(out_f * in_f)) - kept)  # inactive after the drop, just-dropped ones included
    counts = torch.zeros(out_f * in_f, dtype=torch.float64)
    grow_sets = []
    for step in range(1, trials + 1):
        site.set_mask(mask)
        with torch.no_grad():
            site.original.copy_(w0)
        algo.begin_step(step)
        algo.after_optimizer_step(step)
        new = _as_set(site.mask)
        assert kept <= new and len(new) == k  # the drop is exact and deterministic; the count is kept
        grown = new - kept
        assert len(grown) == n and not grown & kept  # grown positions are never ones kept after the drop
        grow_sets.append(frozenset(grown))
        counts[list(grown)] += 1
    assert counts[sorted(kept)].sum() == 0
    observed = counts[candidates]
    m = len(candidates)
    q = n / m
    expected = trials * q
    pearson = float(((observed - expected) ** 2 / expected).sum())
    # n of m without replacement per trial: Pearson's statistic is (1 - q)·m/(m - 1) times a χ²(m - 1) variable
    stat = pearson / ((1 - q) * m / (m - 1))
    assert _chi2_sf(stat, m - 1) > 1e-3, f"growth counts are not uniform: {observed.tolist()}"
    assert len(set(grow_sets)) > trials // 2  # different steps draw different positions
    # the same (seed, step) draws the same positions, which is what keeps processes identical
    site.set_mask(mask)
    with torch.no_grad():
        site.original.copy_(w0)
    algo.begin_step(17)
    algo.after_optimizer_step(17)
    assert frozenset(_as_set(site.mask) - kept) == grow_sets[16]


def test_chi2_check_rejects_a_biased_sampler():
    """The uniformity check above has teeth: a sampler that favours low indices fails it."""
    m, n, trials = 20, 4, 3000
    g = torch.Generator().manual_seed(0)
    weights = torch.linspace(1.0, 1.5, m)
    counts = torch.zeros(m, dtype=torch.float64)
    for _ in range(trials):
        counts[torch.multinomial(weights, n, replacement=False, generator=g)] += 1
    q = n / m
    pearson = float(((counts - trials * q) ** 2 / (trials * q)).sum())
    assert _chi2_sf(pearson / ((1 - q) * m / (m - 1)), m - 1) < 1e-3


def test_update_schedule_and_cosine_drop_fraction():
    recipe = load_recipe("rigl").override(**{"dst.delta_t": 5, "dst.p": 0.4, "dst.stop_fraction": 0.5})
    algo = MagRan(recipe, total_steps=40)
    assert [s for s in range(0, 41) if algo.is_update(s)] == [5, 10, 15, 20]
    from surgeon.sparsity.schedules import drop_fraction

    for s in (5, 10, 20, 35):
        expect = 0.4 * 0.5 * (1 + math.cos(math.pi * min(s, 20) / 20))
        assert drop_fraction(s, 0.4, 40, 0.5, "cosine") == pytest.approx(expect)
    assert drop_fraction(20, 0.4, 40, 0.5, "cosine") == pytest.approx(0.0)
    assert drop_fraction(7, 0.4, 40, 0.5, "constant") == 0.4


def test_mask_updates_never_write_through_to_the_callers_mask_tensor():
    mask = torch.tensor([[True, False, True, False], [False, True, False, True]])
    given = {"0.weight": mask}
    models = []
    for _ in range(2):
        model = nn.Sequential(nn.Linear(4, 2, bias=False))
        inject(model, plan(model, sparsity=0.5, distribution="uniform"), masks=given)
        models.append(model)
    site = sites(models[0])["0.weight"]
    algo = MagRan(_dst_recipe("magran", p=1.0), total_steps=10)
    algo.setup(models[0], Accelerator(cpu=True))
    with torch.no_grad():
        site.original.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]]))
    for step in range(1, 6):
        algo.begin_step(step)
        algo.after_optimizer_step(step)
    assert not torch.equal(site.mask, mask)  # the update moved weights...
    assert torch.equal(given["0.weight"], torch.tensor([[True, False, True, False], [False, True, False, True]]))
    assert torch.equal(sites(models[1])["0.weight"].mask, given["0.weight"])  # ...in this model only


def test_a_position_dropped_and_grown_back_keeps_its_value_and_optimizer_state():
    """The reference RigL rule: only truly new connections start at 0 with fresh optimizer state."""
    from surgeon.training.loop import zero_optimizer_state

    w = torch.tensor([[0.5, 0.0, -0.1, 0.0], [0.0, 3.0, 0.0, -0.7], [0.2, 0.0, 0.9, 0.0]])
    mask = w != 0
    model, site = _layer(3, 4, mask)
    with torch.no_grad():
        site.original.copy_(w)
    opt = torch.optim.AdamW([site.original], lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()  # moments become nonzero at the six active positions
    opt.step()
    opt.zero_grad()
    w_before = site.original.detach().clone()
    moments = {k: v.clone() for k, v in opt.state[site.original].items() if torch.is_tensor(v) and v.dim() == 2}
    assert all(bool((m[mask] != 0).all()) for m in moments.values())

    algo = RigL(_dst_recipe("rigl", p=0.5), total_steps=10)  # k = 6: drop 3, grow 3
    algo.setup(model, Accelerator(cpu=True))
    algo.begin_step(2)
    site.parametrization.dense_grad = torch.tensor(
        [[0.01, -5.0, 4.0, 0.02], [0.03, 0.04, 0.05, 0.06], [0.07, 0.08, 0.09, 3.0]]
    )
    algo.after_backward(2)
    resets = algo.after_optimizer_step(2)
    for fqn, positions in resets.items():
        zero_optimizer_state(opt, algo.sites[fqn].original, positions)

    same = (0, 2)  # smallest |w| (-0.1), dropped, and the second-largest gradient: grown right back
    truly_dropped, truly_new = [(0, 0), (2, 0)], [(0, 1), (2, 3)]
    assert site.mask[same] and site.original[same] == w_before[same]
    assert not resets["0.weight"][same]
    assert all(m[same] == moments[name][same] for name, m in opt.state[site.original].items() if name in moments)
    for pos in truly_dropped + truly_new:
        assert resets["0.weight"][pos] and site.original[pos] == 0
        assert all(m[pos] == 0 for name, m in opt.state[site.original].items() if name in moments)
    assert algo.history[-1]["regrown"] == 2  # the returning position is not counted as regrown


def test_drop_scores_is_the_hook_for_what_is_kept():
    class DropLargest(MagRan):  # a deliberately odd criterion: keep the smallest magnitudes
        def drop_scores(self, site):
            return -site.original.abs()

    w = torch.tensor([[0.5, 0.0, -0.1, 0.0], [0.0, 3.0, 0.0, -0.7], [0.2, 0.0, 0.9, 0.0]])
    model, site = _layer(3, 4, w != 0)
    with torch.no_grad():
        site.original.copy_(w)
    algo = DropLargest(_dst_recipe("magran", p=0.5), total_steps=10)
    algo.setup(model, Accelerator(cpu=True))
    algo.begin_step(1)
    algo.after_optimizer_step(1)
    # kept: the three smallest |w| (-0.1, 0.2, 0.5) keep their values; 3.0, -0.7 and 0.9 left their positions
    # unless grown back, in which case they keep their value too
    for pos, value in (((0, 2), -0.1), ((2, 0), 0.2), ((0, 0), 0.5)):
        assert site.mask[pos] and site.original[pos] == value
    assert int(site.mask.sum()) == 6
