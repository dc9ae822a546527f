"""One-shot calibrated pruning (surgeon prune): Wanda's and SparseGPT's choices and updates checked against direct
implementations, the statistics each layer kind collects, exact patterns, determinism, reloads, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_error, invoke
from helpers_train import SyntheticImageTask, one_thread  # noqa: F401
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

import surgeon
from surgeon.algorithms.calibration import Calibration, draw_timesteps, timestep_weights
from surgeon.algorithms.oneshot import prune_model
from surgeon.algorithms.pruners import Magnitude, Pattern, SparseGPT, Wanda, sparsegpt
from surgeon.algorithms.statistics import InputStats, as_matrix, collecting, conv_columns, from_matrix, run_pass
from surgeon.cli.app import app
from surgeon.errors import SurgeonError
from surgeon.masking.plan import plan as make_plan
from surgeon.masking.surgery import sites
from surgeon.masking.targets import find_targets
from surgeon.models import presets
from surgeon.sparsity.patterns import nm_groups
from surgeon.training.prune import prune


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def correlated(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """``[n, cols]`` inputs whose features are strongly correlated (a random mixing of a few factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 3, generator=g, dtype=torch.float64)
    mixing = torch.randn(3, cols, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.2, 3.0, cols, dtype=torch.float64)
    return (factors @ mixing + 0.1 * torch.randn(n, cols, generator=g, dtype=torch.float64)) * scale


def stats_of(x: torch.Tensor, hessian: bool = True) -> InputStats:
    s = InputStats(x.shape[1], hessian)
    s.add(x)
    return s


# ------------------------------------------------------------------------------------------------------ Wanda
def test_wanda_keeps_the_top_k_of_w_times_input_norm_per_output_row():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    x = correlated(32, 8).float()
    want = (layer.weight.abs() * x.norm(dim=0)[None, :]).argsort(dim=1, descending=True)[:, :4]
    calibration = Calibration.from_batches([{"input": x[:20]}, {"input": x[20:]}])  # the norm spans both batches
    prune_model(layer, make_plan(layer, sparsity=0.5, distribution="uniform"), Wanda(), calibration, progress=False)
    mask = sites(layer)["weight"].mask
    assert all(set(want[r].tolist()) == set(mask[r].nonzero().flatten().tolist()) for r in range(4))
    assert mask.sum(1).tolist() == [4, 4, 4, 4]


def test_wanda_nm_keeps_the_best_n_of_every_group_and_changes_no_kept_weight():
    w = torch.randn(3, 8, dtype=torch.float64)
    x = correlated(40, 8)
    new, keep = Wanda().prune(w, stats_of(x, hessian=False), Pattern(nm=(2, 4)), "layer")
    scores = (w.abs() * x.norm(dim=0)).reshape(3, 2, 4)
    want = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
    assert torch.equal(keep, want.reshape(3, 8)) and torch.equal(new, w * keep)


# -------------------------------------------------------------------------------------------------- SparseGPT
def direct_obs(w, h, damp, kept=None, nm=None, select_every=None):
    """Textbook OBS, column by column with the explicit inverse of the Hessian of the columns not yet fixed:
    pruning w_j moves the free weights by −w_j / [H_F⁻¹]_jj · [H_F⁻¹]_j,:. Masks chosen as SparseGPT does (per
    selection block from the current weights, or per N:M group when the sweep reaches it)."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    d2 = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(cols)])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    total = rows * cols - kept if kept is not None else 0
    for j in range(cols):
        if nm is None and j % select_every == 0:
            j2 = min(j + select_every, cols)
            k = round(total * j2 / cols) - round(total * j / cols)
            score = (w[:, j:j2] ** 2 / d2[j:j2]).flatten()
            idx = torch.sort(score, stable=True).indices[:k]
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[idx] = True
            pruned[:, j:j2] = block.view(rows, -1)
        if nm is not None and j % nm[1] == 0:
            score = w[:, j : j + nm[1]] ** 2 / d2[j : j + nm[1]]
            idx = torch.sort(score, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
            pruned[:, j : j + nm[1]] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
        hinv = torch.linalg.inv(h[j:, j:])
        for r in pruned[:, j].nonzero().flatten().tolist():
            w[r, j:] -= w[r, j] / hinv[0, 0] * hinv[0, :]
    return w, ~pruned


@pytest.mark.parametrize(
    "pattern, block",
    [(Pattern(kept=48), 16), (Pattern(kept=48), 4), (Pattern(kept=20), 5), (Pattern(nm=(2, 4)), 8)],
    ids=["s0.5-one-block", "s0.5-lazy-blocks", "s0.79-uneven-blocks", "2of4-lazy-blocks"],
)
def test_sparsegpt_equals_a_direct_float64_obs_update(pattern, block):
    """Same masks, and weights equal to 1e-9 (float64; the lazy block updates only reorder the arithmetic)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    x = correlated(64, 16)
    h = 2 * x.T @ x / x.shape[0]
    got, keep = sparsegpt(w, h, pattern, block_size=block, damp=0.01)
    want, want_keep = direct_obs(w, h, 0.01, kept=pattern.kept, nm=pattern.nm, select_every=block)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got - want).abs().max()
    assert torch.equal(got != 0, keep) and int(keep.sum()) == (pattern.kept or 48)


@pytest.mark.parametrize("pattern", [Pattern(nm=(2, 4)), Pattern(kept=64)], ids=["2of4", "s0.5"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude_and_wanda(pattern):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    x = correlated(256, 16, seed=3)
    stats = stats_of(x)
    errors = {}
    for pruner in (Magnitude(), Wanda(), SparseGPT(block_size=8)):
        new, _ = pruner.prune(w, stats, pattern, "layer")
        errors[pruner.name] = float(torch.linalg.norm(x @ w.T - x @ new.T))
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


# ----------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(8, 6, 3, padding=1, stride=2), (2, 8, 7, 9)),
        (nn.Conv2d(8, 4, (3, 2), padding="same", dilation=(1, 2), padding_mode="reflect"), (2, 8, 6, 6)),
        (nn.Conv1d(4, 4, 3, padding=1), (2, 4, 10)),
    ],
    ids=["conv2d-strided", "conv2d-reflect-dilated", "conv1d"],
)
def test_conv_columns_are_f_unfold_in_nhwc_order_and_the_nm_grouping(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    cols = conv_columns(conv, x)  # [B, P, kh·kw·in]
    w2d = as_matrix(conv.weight.detach())
    out = conv(x).detach()
    assert torch.allclose(cols @ w2d.T + conv.bias.detach(), out.flatten(2).transpose(1, 2), atol=1e-5)
    if conv.padding_mode == "zeros" and isinstance(conv, nn.Conv2d):
        unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [B, in·kh·kw, P]
        b, c, p = unfolded.shape
        reordered = unfolded.view(b, shape[1], -1, p).transpose(1, 2).reshape(b, c, p).transpose(1, 2)
        assert torch.equal(cols, reordered)
    # the N:M groups of surgeon's masks are M adjacent columns of the same matrix
    assert torch.equal(nm_groups(conv.weight.detach(), 4), w2d.reshape(-1, 4))
    assert torch.equal(from_matrix(w2d, conv.weight.shape), conv.weight.detach())


@pytest.mark.parametrize("rnn", [nn.GRU, nn.LSTM])
def test_a_recurrent_layers_statistics_come_from_its_own_inputs_and_hidden_states(rnn):
    """Layer 1 sees what layer 0 outputs (computed here by torch's own one-layer GRU/LSTM), and each weight_hh the
    hidden states its own layer and direction feed back; the model's input reaches only layer 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), rnn(4, 5, num_layers=2, bidirectional=True, batch_first=True))
    gru = model[1]
    x = torch.randn(2, 6, 3)
    targets = {f: t for f, t in find_targets(model).items() if t.kind == "rnn"}
    with collecting(targets, hessian=True) as (stats, ctx):
        run_pass(model, Calibration([{"x": x}], lambda m, i: m(i["x"])), ctx)
    with torch.no_grad():
        h_in = model[0](x)
        first = rnn(4, 5, num_layers=1, bidirectional=True, batch_first=True)
        for name in first._flat_weights_names:
            getattr(first, name).copy_(getattr(gru, name))
        between, _ = first(h_in)  # [2, 6, 10]: layer 1's input
        out, _ = gru(h_in)
    zero = torch.zeros(2, 1, 5)

    def xtx(rows):
        rows = rows.reshape(-1, rows.shape[-1]).double()
        return rows.T @ rows

    expect = {
        "1.weight_ih_l0": h_in,
        "1.weight_ih_l0_reverse": h_in,
        "1.weight_ih_l1": between,
        "1.weight_ih_l1_reverse": between,
        "1.weight_hh_l0": torch.cat([zero, between[:, :-1, :5]], 1),
        "1.weight_hh_l0_reverse": torch.cat([zero, between[:, 1:, 5:]], 1),
        "1.weight_hh_l1": torch.cat([zero, out[:, :-1, :5]], 1),
        "1.weight_hh_l1_reverse": torch.cat([zero, out[:, 1:, 5:]], 1),
    }
    for fqn, rows in expect.items():
        assert torch.allclose(stats[fqn].xtx, xtx(rows), atol=1e-5), fqn
        assert stats[fqn].count == 12


def _stroke_batches(garbage: float | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([9, 5, 7, 3])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    x = torch.randn(4, 9, 3, generator=g)
    if garbage is not None:
        x = torch.where(mask[..., None], x, torch.full_like(x, garbage))
    return [{"x_t": x, "t": torch.tensor([10, 400, 800, 999]), "mask": mask}]


def test_padded_sequence_positions_change_nothing():
    results = []
    for garbage in (0.0, 50.0):
        model = presets.build("tiny-chirodiff", seed=0)
        calibration = Calibration.from_batches(_stroke_batches(garbage), padding_key="mask")
        prune_model(model, make_plan(model, nm="2:4"), SparseGPT(block_size=8), calibration, progress=False)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    # without the padding mask, the garbage does reach the statistics: the test can tell
    model = presets.build("tiny-chirodiff", seed=0)
    calibration = Calibration.from_batches(_stroke_batches(50.0))
    prune_model(model, make_plan(model, nm="2:4"), SparseGPT(block_size=8), calibration, progress=False)
    assert any(not torch.equal(results[0][k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------- whole-model pruning
def _pruned(method: str, seed: int = 1, sequential: bool = True, **pattern):
    model = presets.build("tiny-unet", seed=seed)
    task = SyntheticImageTask(model, n=24)
    return prune(model, task, method=method, calib=12, batch_size=6, sequential=sequential, progress=False, **pattern)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [{"nm": "2:4"}, {"sparsity": 0.5}, {"sparsity": 0.7, "distribution": "erk"}])
def test_every_method_meets_the_pattern_exactly(method, pattern):
    result = _pruned(method, **pattern)
    model = result.model
    defaults = {} if "nm" in pattern else {"distribution": "uniform"}  # prune's default budget
    plan = make_plan(presets.build("tiny-unet"), **{**defaults, **pattern})
    for fqn, site in sites(model).items():
        lp = plan.layers[fqn]
        effective = site.effective().detach()
        assert torch.equal(effective != 0, site.mask) or int((effective != 0).sum()) <= int(site.mask.sum())
        if lp.nm:
            assert bool((nm_groups(site.mask, 4).sum(1) == 2).all()), fqn
        else:
            assert int(site.mask.sum()) == lp.kept, fqn
    assert set(sites(model)) == {f for f, lp in plan.layers.items() if not lp.is_dense}


def test_sequential_and_parallel_differ_and_each_is_deterministic():
    def weights(sequential):
        model = _pruned("sparsegpt", sequential=sequential, nm="2:4").model
        return torch.cat([s.effective().detach().flatten() for s in sites(model).values()])

    seq, par = weights(True), weights(False)
    assert torch.equal(seq, weights(True)) and torch.equal(par, weights(False))
    assert not torch.equal(seq, par)


def test_the_pruned_model_reloads_with_identical_outputs_and_records_the_method(tmp_path, run_preset):
    model = presets.build("tiny-unet", seed=1)
    result = prune(
        model,
        SyntheticImageTask(model, n=24),
        tmp_path / "pruned",
        method="sparsegpt",
        nm="2:4",
        calib=12,
        timesteps="4-stratified",
        progress=False,
    )
    loaded = surgeon.load(tmp_path / "pruned")
    assert torch.equal(run_preset("tiny-unet", loaded), run_preset("tiny-unet", result.model))
    from surgeon.io.container import read_metadata

    info = read_metadata(tmp_path / "pruned")["extra"]["prune"]
    assert info["method"] == "sparsegpt" and info["pattern"] == "2:4" and info["sequential"] is True
    assert info["calibration"]["examples"] == 12 and info["calibration"]["timesteps"] == "4-stratified"
    assert (info["block_size"], info["damp"]) == (128, 0.01)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "pruned"), "--nm", "2:4", "--json"])
    rows = json.loads(r.stdout)["rows"]
    assert all(row["nm_valid"] for row in rows if row["masked"]) and sum(bool(row["masked"]) for row in rows) == 50
    r = CliRunner().invoke(
        app, ["export", str(tmp_path / "pruned"), "--format", "semi-structured", "--out", str(tmp_path / "deploy")]
    )
    assert r.exit_code == 0, r.output


def test_timestep_schemes():
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps(16, 1000, "4-stratified", g)
    assert [int(((t >= 250 * k) & (t < 250 * (k + 1))).sum()) for k in range(4)] == [4, 4, 4, 4]
    assert timestep_weights(t, 1000, "uniform") is None
    w = timestep_weights(torch.tensor([0, 500, 999]), 1000, "weighted")
    assert w[0] < w[1] < w[2] and float(w[2]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "args, words",
    [
        (["--calib", 0, "--data", "kanjivg"], "--calib must be ≥ 1"),
        (["--damp", 0, "--data", "kanjivg"], "--damp must be > 0"),
        (["--damp", -0.5, "--data", "kanjivg"], "--damp must be > 0"),
        ([], "--method sparsegpt needs calibration data"),
        (["--timesteps", "often", "--data", "kanjivg"], "unknown timestep scheme"),
        (["--block-size", 6, "--data", "kanjivg"], "not a multiple of M=4"),
        (["--s", 0.5, "--data", "kanjivg"], "give exactly one of --s"),
    ],
)
def test_bad_options_are_one_error_and_write_nothing(tmp_path, args, words):
    out = tmp_path / "out"
    assert_one_error(invoke("prune", "tiny-unet", "--nm", "2:4", "--out", out, *args), words)
    assert not out.exists()


def test_a_model_masked_by_another_pattern_is_refused(tmp_path):
    model = presets.build("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.9, distribution="uniform"))
    surgeon.save(model, tmp_path / "sparse")
    out = tmp_path / "out"
    r = invoke("prune", tmp_path / "sparse", "--nm", "2:4", "--method", "magnitude", "--out", out)
    assert_one_error(r, "already masked by another pattern")
    assert not out.exists()


def test_a_singular_hessian_that_damping_cannot_fix_names_the_layer(tmp_path):
    layer = nn.Sequential(nn.Linear(8, 4))
    calibration = Calibration.from_batches([{"input": torch.ones(16, 8)}])  # rank 1: every row the same
    with pytest.raises(SurgeonError, match=r"the Hessian of 0\.weight is singular even with damping 1e-30") as e:
        prune(layer, calibration, tmp_path / "out", method="sparsegpt", nm="2:4", damp=1e-30, progress=False)
    assert "--damp" in e.value.hint and not (tmp_path / "out").exists()
    assert not sites(layer)  # untouched


# ------------------------------------------------------------------------------- fine-tuning from a pruned start
def _ft(name: str, **changes):
    from surgeon.recipe import load_recipe

    base = {"training.batch_size": 4, "training.eval_batches": 1, "training.num_samples": 0, "training.steps": 0}
    return load_recipe(name).override(**{**base, **changes})


def _weights(model) -> dict[str, torch.Tensor]:
    return {f: s.effective().detach().clone() for f, s in sites(model).items()}


def test_finetune_init_starts_from_the_pruned_mask_and_updated_weights(tmp_path):
    from surgeon.training.run import finetune

    teacher = presets.build("tiny-unet", seed=1)
    task = SyntheticImageTask(teacher, n=24)
    student = presets.build("tiny-unet", seed=1)
    prune(student, task, tmp_path / "pruned", method="sparsegpt", nm="2:4", calib=12, progress=False)
    pruned = _weights(surgeon.load(tmp_path / "pruned"))
    for recipe in ("one-shot", "sparsedm"):  # ASP's fixed mask, and SparseDM's S(W) at its first step
        finetune(teacher, task, tmp_path / recipe, _ft(recipe), init=tmp_path / "pruned", progress=False, samples=False)
        started = _weights(surgeon.load(tmp_path / recipe / "model"))
        assert started.keys() == pruned.keys()
        assert all(torch.equal(started[f], pruned[f]) for f in pruned), recipe
    finetune(teacher, task, tmp_path / "magnitude", _ft("one-shot"), progress=False, samples=False)
    magnitude = _weights(surgeon.load(tmp_path / "magnitude" / "model"))
    assert any(not torch.equal(magnitude[f], pruned[f]) for f in pruned)


def test_a_recipe_with_a_prune_section_prunes_the_student_first(tmp_path):
    from surgeon.training.run import finetune

    teacher = presets.build("tiny-unet", seed=1)
    task = SyntheticImageTask(teacher, n=24)
    recipe = _ft("sparsegpt-2of4", **{"prune.calib": 12, "prune.batch_size": 6})
    summary = finetune(teacher, task, tmp_path / "run", recipe, progress=False, samples=False)
    assert summary.nm["nm_valid"] == summary.nm["converted"] == 50
    direct = prune(
        presets.build("tiny-unet", seed=1), task, method="sparsegpt", nm="2:4", calib=12, batch_size=6, progress=False
    )
    got = _weights(surgeon.load(tmp_path / "run" / "model"))
    assert all(torch.equal(got[f], w) for f, w in _weights(direct.model).items())


def test_pruned_starts_and_prune_sections_refuse_what_they_cannot_use(tmp_path):
    from surgeon.recipe import Recipe
    from surgeon.training.run import finetune

    teacher = presets.build("tiny-unet", seed=1)
    task = SyntheticImageTask(teacher, n=24)
    prune(presets.build("tiny-unet", seed=1), task, tmp_path / "s05", method="magnitude", sparsity=0.5, progress=False)
    with pytest.raises(SurgeonError, match="is not 2:4, but the recipe fine-tunes 2:4"):
        finetune(teacher, task, tmp_path / "run", _ft("sparsedm"), init=tmp_path / "s05", progress=False)
    with pytest.raises(SurgeonError, match="--init gives a pruned start as well"):
        finetune(teacher, task, tmp_path / "run", _ft("sparsegpt-2of4"), init=tmp_path / "s05", progress=False)
    assert not (tmp_path / "run").exists()
    base = {"algorithm": "nm_fixed", "nm": "2:4", "init": "pretrained"}
    with pytest.raises(SurgeonError, match="unknown key 'prune.calibrate'"):
        Recipe.from_dict({**base, "prune": {"calibrate": 3}})
    with pytest.raises(SurgeonError, match="unknown prune method 'obs'"):
        Recipe.from_dict({**base, "prune": {"method": "obs"}})
    with pytest.raises(SurgeonError, match="algorithm static does not use 'prune'"):
        Recipe.from_dict({"algorithm": "static", "prune": {"method": "wanda"}})
