"""``surgeon reproduce`` on a micro scale: the budget's share-out, a tiny study end to end, resuming, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from surgeon.cli.app import app
from surgeon.errors import SurgeonError, UsageError
from surgeon.study.reproduce import allocate, reproduce, study_runs

TIMING = {
    "image_step_s": 0.2,
    "chiro_step_s": 0.5,
    "image_run_fixed_s": 5.0,
    "chiro_run_fixed_s": 5.0,
    "image_eval_fixed_s": 4.0,
    "image_eval_per_sample_s": 0.1,
    "chiro_eval_fixed_s": 4.0,
    "chiro_eval_per_sample_s": 0.2,
}


def test_the_study_has_the_papers_grid():
    names = [r.name for r in study_runs()]
    assert len(names) == 18 and names[0] == "dense"
    for s in ("0.25", "0.5", "0.75", "0.9"):
        assert {f"static-s{s}", f"rigl-s{s}-p0.5", f"magran-s{s}-p0.5"} <= set(names)
    assert {
        "rigl-s0.9-p0.05",
        "magran-s0.9-p0.05",
        "chiro-dense",
        "chiro-magran-s0.9-p0.5",
        "chiro-rigl-s0.25-p0.5",
    } <= set(names)


def test_the_budget_decides_the_steps():
    img30, chiro30, eval_s = allocate(30, TIMING, n=128, n_img=15, n_chiro=3, updates=10)
    img60, chiro60, _ = allocate(60, TIMING, n=128, n_img=15, n_chiro=3, updates=10)
    assert eval_s == pytest.approx(15 * (4 + 128 * 0.1) + 3 * (4 + 128 * 0.2))
    assert 0 < img30 < img60 and 0 < chiro30 < chiro60
    train_s = 30 * 60 * 0.85 - eval_s - 18 * 5
    assert 15 * img30 * 0.2 + 3 * chiro30 * 0.5 == pytest.approx(train_s, rel=0.01)  # the budget is used, not exceeded
    with pytest.raises(UsageError, match="too little time") as e:
        allocate(3, TIMING, n=128, n_img=15, n_chiro=3, updates=10)
    assert "--budget-minutes" in e.value.hint


def test_a_micro_study_runs_scores_reports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "study"
    kw = dict(
        n=4,
        sample_steps=1,
        progress=False,
        image_model="tiny-unet",
        chiro_model="tiny-chirodiff",
        limit=16,  # a default batch (16): a batch larger than the data is refused
        updates=1,
        only=["dense", "rigl-s0.9-p0.05", "chiro-dense"],
        steps=(2, 2),
        seeds=2,
        eta=1.0,
        ema=0.9,
    )
    report = reproduce(1, out, **kw)
    text = report.read_text()
    # η and EMA reach every run's recipe (so its samples and scores), the plan and the report
    from surgeon.recipe import load_recipe

    for run in ("images/dense", "images/rigl-s0.9-p0.05", "strokes/chiro-dense"):
        recorded = load_recipe(str(out / run / "seed-1/recipe.yaml"))
        assert recorded.diffusion.eta == 1.0 and recorded.training.ema_decay == 0.9, run
    assert "EMA decay 0.9" in text.splitlines()[2] and "η = 1," in text.splitlines()[2]
    assert "not comparable with Inception FID" in text and "| rigl-s0.9-p0.05 | rigl | 0.90 | 0.05 | 2 |" in text
    # two independent runs per configuration: seeds 0 and 1 draw different masks, and the table shows mean ± std
    from surgeon.formats.loading import load_model
    from surgeon.masking.surgery import sites

    masks = [
        {f: s.mask.clone() for f, s in sites(load_model(str(out / f"images/rigl-s0.9-p0.05/seed-{k}/model"))).items()}
        for k in (0, 1)
    ]
    assert masks[0].keys() == masks[1].keys() and any(not (masks[0][f] == masks[1][f]).all() for f in masks[0])
    seeds = [json.loads((out / f"images/dense/seed-{k}/eval.json").read_text())["fid"] for k in (0, 1)]
    assert seeds[0] != seeds[1]
    dense_line = next(line for line in text.splitlines() if line.startswith("| dense |"))
    mean = sum(seeds) / 2
    std = abs(seeds[0] - seeds[1]) / 2**0.5
    assert f"{mean:.2f} ± {std:.2f}" in dense_line
    assert "precision" in text and "Welch" in text
    # steps given, not a time budget; both studies ran, so both are named
    assert "Steps given (--steps), no time budget" in text and "Budget" not in text.splitlines()[2]
    assert "Image runs: `tiny-unet`, 2 steps each; ChiroDiff runs: `tiny-chirodiff`, 2 steps each" in text
    assert "chiro-dense" in text and "## The paper's findings" in text
    for name in (
        "images/samples_side_by_side.png",
        "images/fid_vs_sparsity.png",
        "images/fid_vs_flops.png",
        "images/loss_curves.png",
        "strokes/samples_side_by_side.png",
        "images/dense/seed-0/loss.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["image_steps"] == 2 and plan["runs"] == ["dense", "rigl-s0.9-p0.05", "chiro-dense"]
    assert plan["eta"] == 1.0 and plan["ema"] == 0.9
    for flag, value in (("eta", 0.0), ("ema", 0.99)):  # a resumed study keeps its sampler and EMA
        with pytest.raises(SurgeonError, match=f"planned with --{flag} "):
            reproduce(1, out, **{**kw, flag: value})
    rigl = json.loads((out / "images/rigl-s0.9-p0.05/seed-0/eval.json").read_text())
    assert rigl["sparsity"] == pytest.approx(0.9, abs=0.01) and rigl["fid"] > 0 and rigl["n_samples"] == 4

    # an interrupted run (no summary yet, a checkpoint left) continues; finished runs and scores are kept
    dense_mtime = (out / "images/dense/seed-0/summary.json").stat().st_mtime_ns
    (out / "images/rigl-s0.9-p0.05/seed-0/summary.json").unlink()
    (out / "images/rigl-s0.9-p0.05/seed-0/eval.json").unlink()
    assert list((out / "images/rigl-s0.9-p0.05/seed-0/checkpoints").glob("step-*.safetensors"))
    reproduce(1, out, **{**kw, "steps": (50, 50)})  # a resumed study keeps its plan
    assert (out / "images/dense/seed-0/summary.json").stat().st_mtime_ns == dense_mtime
    assert json.loads((out / "images/rigl-s0.9-p0.05/seed-0/summary.json").read_text())["steps"] == 2
    assert (out / "images/rigl-s0.9-p0.05/seed-0/eval.json").is_file()


def test_bad_inputs(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("not a study")
    with pytest.raises(SurgeonError, match="other than a study"):
        reproduce(1, tmp_path / "busy", steps=(2, 2))
    r = CliRunner().invoke(app, ["reproduce", "--budget-minutes", "0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "error: --budget-minutes 0 must be positive" in r.stderr and "hint:" in r.stderr
    r = CliRunner().invoke(app, ["reproduce", "--only", "rigl-s0.33", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown run(s): rigl-s0.33" in r.stderr
    for bad in ("0", "-1"):
        r = CliRunner().invoke(app, ["reproduce", "--seeds", bad, "--out", str(tmp_path / "o")])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert lines == [lines[0], lines[1]] and lines[0].startswith(f"error: --seeds {bad} must be")
        assert lines[1].startswith("hint: ")
    for flag, bad in (("--eta", "1.5"), ("--eta", "-0.1"), ("--ema", "1"), ("--ema", "0")):
        r = CliRunner().invoke(app, ["reproduce", flag, bad, "--steps", "2", "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and f"error: {flag} {float(bad)} must be in" in r.stderr and "hint:" in r.stderr
    assert not (tmp_path / "o").exists()


def test_every_run_of_the_study_has_a_valid_recipe():
    from surgeon.study.reproduce import StudyPlan, _recipe

    plan = StudyPlan(
        30,
        "unet-kanji",
        "chirodiff",
        200,
        100,
        128,
        20,
        16,
        2e-3,
        2e-3,
        10,
        None,
        "efficientnet-lite0",
        [r.name for r in study_runs()],
    )
    old = _recipe(study_runs()[0], plan)  # a plan from before η and EMA were settings: what it trained with
    assert old.diffusion.eta == 0.0 and old.training.ema_decay is None
    plan.eta, plan.ema = 1.0, 0.995
    for spec in study_runs():
        r = _recipe(spec, plan)
        assert r.algorithm == spec.algorithm and r.name == spec.name
        assert r.diffusion.eta == 1.0 and r.training.ema_decay == 0.995
        assert r.training.steps == (200 if spec.study == "images" else 100)
        if spec.algorithm in ("rigl", "magran"):
            assert r.dst.p == spec.p and r.dst.delta_t == (20 if spec.study == "images" else 10)
        if spec.algorithm != "dense":
            assert r.sparsity == spec.sparsity


def test_findings_are_shown_only_beyond_the_seeds_spread():
    from surgeon.study.report import findings
    from surgeon.study.reproduce import StudyRow

    specs = {r.name: r for r in study_runs()}

    def rows(name, *fids):
        return [
            StudyRow(specs[name], {}, {"fid": f, "sparsity": specs[name].sparsity}, "", k) for k, f in enumerate(fids)
        ]

    study = (
        rows("dense", 100.0, 101.0, 99.0)
        + rows("static-s0.5", 100.5, 99.0, 101.5)  # within the spread of dense: not resolved
        + rows("rigl-s0.5-p0.5", 90.0, 90.5, 89.5)  # far beyond the spread: resolved, dynamic better
        + rows("magran-s0.5-p0.5", 80.0, 120.0, 100.0)  # a lower mean, but a wide spread: not resolved
        + rows("rigl-s0.9-p0.05", 150.0, 151.0, 149.0)
        + rows("rigl-s0.9-p0.5", 170.0, 171.0, 169.0)
    )
    text = "\n".join(findings(study))
    assert "static-s0.5 100.33 ± 1.26 vs dense 100.00 ± 1.00: not resolved at this budget (Welch p = 0.7" in text
    assert "rigl-s0.5-p0.5 90.00 ± 0.50 vs static-s0.5 100.33 ± 1.26: dynamic better (Welch p = 0.00" in text
    assert "magran-s0.5-p0.5 100.00 ± 20.00 vs static-s0.5 100.33 ± 1.26: not resolved at this budget" in text
    assert "dynamic better in 1, static better in 0, not resolved in 1 of 2" in text
    assert "rigl-s0.9-p0.05 150.00 ± 1.00 vs rigl-s0.9-p0.5 170.00 ± 1.00: p = 0.05 better" in text
    assert "Verdict: shown" in findings(study)[-1]
    # one seed per run: no spread, so nothing is resolved, whatever the difference
    single = [r for r in study if r.seed == 0]
    assert all("not resolved" in f or "no pair differs" in f for f in findings(single)), findings(single)


def test_welch_matches_reference_values():
    from surgeon.evaluation.stats import t_two_sided_p, welch

    # Student's t table, two-sided 95 %: t = 12.706 (df 1), 4.303 (df 2), 2.228 (df 10)
    for t, df in ((12.706, 1), (4.303, 2), (2.228, 10)):
        assert t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    c = welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])  # scipy.stats.ttest_ind(..., equal_var=False): p = 0.02131
    assert c.p == pytest.approx(0.021311641, rel=1e-6) and c.df == pytest.approx(4.0) and c.resolved
    assert welch([1.0], [2.0, 3.0]).p is None
