"""``surgeon reproduce``: the sparse-to-sparse study on KanjiVG in one command, scaled to a time budget.

Images (a UNet on rendered glyphs): dense vs Static-DM, RigL-DM and MagRan-DM at S ∈ {0.25, 0.5, 0.75, 0.9} with
the paper's main prune-and-regrowth fraction p = 0.5, plus RigL and MagRan at S = 0.9 with p = 0.05; every run
trains the same number of steps. Strokes (ChiroDiff on KanjiVG): dense vs MagRan-DM at S = 0.9 and RigL-DM at
S = 0.25. Every model is scored the same way (``surgeon.evaluate``: FID, KID, held-out loss, parameters, FLOPs).

The budget decides the steps: a short calibration times a training step of each model and the scoring of a
sample, and the remaining time is shared out (80 % images, 20 % strokes, after the evaluation's estimated cost).
The plan (steps and every setting) is written to ``plan.json`` first; re-running the command resumes from it:
finished runs and scores are kept, an interrupted run continues from its last checkpoint.

Seed repeats (``seeds`` = K): every run is trained K times, with seeds 0..K-1 (masks, initial weights, data order,
noise), in ``<study>/<run>/seed-<k>/``; every model is trained before any is scored, and the report gives mean ±
std over the seeds and calls a finding shown only when Welch's t-test over the seeds resolves it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from surgeon.errors import SurgeonError, UsageError
from surgeon.study.report import LOW_P, MAIN_P

SPARSITIES = (0.25, 0.5, 0.75, 0.9)
IMAGE_SHARE = 0.8  # of the training time; the rest goes to ChiroDiff
SAFETY = 0.85  # plan to finish within this fraction of the budget (the machine may get busier)
PLAN_VERSION = 2  # 2: seed repeats, one folder per (run, seed)


@dataclass(frozen=True)
class RunSpec:
    name: str
    study: str  # "images" | "strokes"
    algorithm: str  # dense | static | rigl | magran
    sparsity: float
    p: float | None = None

    @property
    def method(self) -> str:
        return self.algorithm if self.p in (None, MAIN_P) else f"{self.algorithm} p={self.p:g}"


def study_runs() -> list[RunSpec]:
    runs = [RunSpec("dense", "images", "dense", 0.0)]
    for s in SPARSITIES:
        runs.append(RunSpec(f"static-s{s:g}", "images", "static", s))
        for algo in ("rigl", "magran"):
            runs.append(RunSpec(f"{algo}-s{s:g}-p{MAIN_P:g}", "images", algo, s, MAIN_P))
    for algo in ("rigl", "magran"):
        runs.append(RunSpec(f"{algo}-s0.9-p{LOW_P:g}", "images", algo, 0.9, LOW_P))
    runs += [
        RunSpec("chiro-dense", "strokes", "dense", 0.0),
        RunSpec(f"chiro-magran-s0.9-p{MAIN_P:g}", "strokes", "magran", 0.9, MAIN_P),
        RunSpec(f"chiro-rigl-s0.25-p{MAIN_P:g}", "strokes", "rigl", 0.25, MAIN_P),
    ]
    return runs


@dataclass
class StudyPlan:
    budget_minutes: float
    image_model: str
    chiro_model: str
    image_steps: int
    chiro_steps: int
    n: int  # samples scored per model
    sample_steps: int
    batch_size: int
    lr: float
    chiro_lr: float
    updates: int  # mask updates per run (ΔT_e = steps // updates)
    limit: int | None  # training examples (None: all)
    extractor: str
    runs: list[str]
    calibration: dict = field(default_factory=dict)
    seeds: int = 1  # every run is trained with seeds 0..seeds-1
    version: int = PLAN_VERSION
    # the sampler's DDIM η and the weights' EMA decay (None: no EMA); a plan written before they existed has these
    eta: float = 0.0
    ema: float | None = None

    def delta_t(self, study: str) -> int:
        return max(1, (self.image_steps if study == "images" else self.chiro_steps) // self.updates)


def _recipe(spec: RunSpec, plan: StudyPlan, seed: int = 0):
    from surgeon.recipe import load_recipe

    steps = plan.image_steps if spec.study == "images" else plan.chiro_steps
    changes: dict[str, object] = {
        "training.seed": seed,
        "training.steps": steps,
        "training.batch_size": plan.batch_size,
        "optimizer.lr": plan.lr if spec.study == "images" else plan.chiro_lr,
        "training.checkpoint_every": max(1, steps // 4),
        "training.num_samples": 16,
        "training.log_every": max(1, steps // 50),
        "diffusion.sample_steps": plan.sample_steps,
        "diffusion.eta": plan.eta,  # recorded in the model, so scoring samples with it too
        "training.ema_decay": plan.ema,
    }
    if spec.algorithm != "dense":
        changes["sparsity"] = spec.sparsity
    if spec.algorithm in ("rigl", "magran"):
        changes.update({"dst.p": spec.p, "dst.delta_t": plan.delta_t(spec.study)})
    return load_recipe(spec.algorithm).override(**changes).override(name=spec.name)


def _calibrate(
    image_model: str,
    chiro_model: str,
    batch_size: int,
    lr: float,
    limit: int | None,
    out: Path,
    sample_steps: int,
    extractor: str,
) -> dict:
    """Seconds per training step of each model, per scored image, and of the reference features still to compute."""
    import shutil

    import torch

    from surgeon.evaluation.evaluate import evaluate
    from surgeon.recipe import load_recipe
    from surgeon.training.run import sparsify

    timing = {}
    probe = out / "calibration"
    for key, model, steps in (("image", image_model, 6), ("chiro", chiro_model, 4)):
        r = load_recipe("rigl").override(
            **{
                "training.steps": steps,
                "training.batch_size": batch_size,
                "optimizer.lr": lr,
                "training.checkpoint_every": steps,
                "training.num_samples": 0,
                "dst.delta_t": 2,
                "sparsity": 0.5,
            }
        )
        started = time.perf_counter()
        summary = sparsify(model, r, "kanjivg", probe / key, limit=limit, force=True, progress=False, samples=False)
        timing[f"{key}_step_s"] = summary.seconds_per_step
        # loading, data, saving, samples: paid once per run (the probe writes no samples; a run's 16 are cheap)
        timing[f"{key}_run_fixed_s"] = max(time.perf_counter() - started - steps * summary.seconds_per_step, 0.0)
        evaluate(probe / key, n=4, sample_steps=sample_steps, extractor=extractor, progress=False, limit=limit)
        started = time.perf_counter()  # the reference features are cached now: what remains is a fixed cost...
        evaluate(probe / key, n=4, sample_steps=sample_steps, extractor=extractor, progress=False, limit=limit)
        fixed = time.perf_counter() - started
        per_sample = _sample_cost(probe / key, sample_steps, extractor, limit)  # ...plus a cost per sample
        timing[f"{key}_eval_per_sample_s"] = per_sample
        timing[f"{key}_eval_fixed_s"] = max(fixed - 4 * per_sample, 0.0)
    shutil.rmtree(probe, ignore_errors=True)
    timing["threads"] = torch.get_num_threads()
    return timing


def _sample_cost(run_dir: Path, sample_steps: int, extractor: str, limit: int | None, k: int = 16) -> float:
    """Seconds to generate one sample and extract its features, timed on ``k`` samples."""
    from surgeon.evaluation.evaluate import generate_images, open_model
    from surgeon.evaluation.extractors import EXTRACTORS, load_extractor
    from surgeon.evaluation.fidelity import extract_features
    from surgeon.tasks import make_task

    model, _, vae, _ = open_model(run_dir)
    task = make_task(model.eval(), "kanjivg", vae=vae, limit=limit)
    task.dataset("train")
    feats = load_extractor(EXTRACTORS[extractor])
    started = time.perf_counter()
    extract_features(feats, generate_images(task, model, k, sample_steps, 0, k))
    return (time.perf_counter() - started) / k


def allocate(
    budget_minutes: float, timing: dict, n: int, n_img: int, n_chiro: int, updates: int, spent: float = 0.0
) -> tuple[int, int, float]:
    """Training steps per image run and per ChiroDiff run that fit the budget, from calibrated ``timing``
    (seconds per step, per run, per scored sample); returns (image steps, ChiroDiff steps, scoring estimate in s)."""
    eval_s = sum(
        count * (timing[f"{k}_eval_fixed_s"] + n * timing[f"{k}_eval_per_sample_s"])
        for k, count in (("image", n_img), ("chiro", n_chiro))
    )
    fixed_s = n_img * timing["image_run_fixed_s"] + n_chiro * timing["chiro_run_fixed_s"]
    train_s = budget_minutes * 60 * SAFETY - spent - eval_s - fixed_s
    image_steps = int(train_s * (IMAGE_SHARE if n_chiro else 1.0) / max(n_img, 1) / timing["image_step_s"])
    chiro_steps = int(train_s * (1 - IMAGE_SHARE) / n_chiro / timing["chiro_step_s"]) if n_chiro else 0
    if (n_img and image_steps < 2 * updates) or (n_chiro and chiro_steps < 2 * updates):
        per_step = n_img * timing["image_step_s"] / (IMAGE_SHARE if n_chiro else 1.0) + n_chiro * timing[
            "chiro_step_s"
        ] / (1 - IMAGE_SHARE)
        need = math.ceil((spent + eval_s + fixed_s + 2 * updates * per_step) / 60 / SAFETY)
        raise UsageError(
            f"--budget-minutes {budget_minutes:g} leaves too little time to train {n_img + n_chiro} runs "
            f"(scoring {n} samples per model takes about {eval_s / 60:.1f} min in all)",
            f"give at least --budget-minutes {need}, or score fewer samples (--n)",
        )
    return image_steps, chiro_steps, eval_s


def make_plan(
    budget_minutes: float,
    out: Path,
    n: int,
    sample_steps: int,
    image_model: str,
    chiro_model: str,
    batch_size: int,
    lr: float,
    chiro_lr: float,
    updates: int,
    limit: int | None,
    extractor: str | None,
    runs: Sequence[RunSpec],
    steps: tuple[int, int] | None = None,
    console=None,
    seeds: int = 1,
    eta: float = 0.0,
    ema: float | None = None,
) -> StudyPlan:
    """Calibrate and share out the budget, or take ``steps`` = (image steps, ChiroDiff steps) as given."""
    from surgeon.evaluation.extractors import resolve_extractor

    info = resolve_extractor(extractor)
    n_img = sum(r.study == "images" for r in runs) * seeds
    timing: dict = {}
    if steps is not None:
        image_steps, chiro_steps = steps
    else:
        started = time.perf_counter()
        timing = _calibrate(image_model, chiro_model, batch_size, lr, limit, out, sample_steps, info.name)
        timing["calibration_s"] = time.perf_counter() - started
        image_steps, chiro_steps, timing["eval_estimate_s"] = allocate(
            budget_minutes, timing, n, n_img, len(runs) * seeds - n_img, updates, timing["calibration_s"]
        )
        if console is not None:
            console.print(
                f"calibrated in {timing['calibration_s']:.0f}s: {timing['image_step_s']:.2f} s/step "
                f"({image_model}), {timing['chiro_step_s']:.2f} s/step ({chiro_model}); scoring ≈ "
                f"{timing['eval_estimate_s'] / 60:.1f} min → {image_steps} steps per image run, "
                f"{chiro_steps} per ChiroDiff run"
            )
    return StudyPlan(
        budget_minutes,
        image_model,
        chiro_model,
        image_steps,
        chiro_steps,
        n,
        sample_steps,
        batch_size,
        lr,
        chiro_lr,
        updates,
        limit,
        info.name,
        [r.name for r in runs],
        timing,
        seeds,
        eta=eta,
        ema=ema,
    )


def _load_plan(path: Path) -> StudyPlan:
    try:
        data = json.loads(path.read_text())
        plan = StudyPlan(**data)
    except (OSError, ValueError, TypeError) as e:
        raise SurgeonError(
            f"{path} is not a study plan this version can resume ({e})", "pass --force to start the study over"
        ) from e
    if plan.version != PLAN_VERSION:
        raise SurgeonError(f"{path} has plan version {plan.version}", "pass --force to start the study over")
    return plan


def _write_json(path: Path, data) -> None:
    from surgeon.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _train(spec: RunSpec, plan: StudyPlan, seed: int, run_dir: Path, progress: bool) -> dict:
    from surgeon.training.checkpoint import list_checkpoints
    from surgeon.training.run import sparsify

    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    resume = run_dir if list_checkpoints(run_dir / "checkpoints") else None
    model = plan.image_model if spec.study == "images" else plan.chiro_model
    summary = sparsify(
        model,
        _recipe(spec, plan, seed),
        "kanjivg",
        run_dir,
        limit=plan.limit,
        force=resume is None,
        resume=resume,
        progress=progress,
    )
    return asdict(summary)


def _score(run_dir: Path, plan: StudyPlan, progress: bool) -> dict:
    from surgeon.evaluation.evaluate import evaluate

    path = run_dir / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate(
        run_dir,
        data="kanjivg",
        n=plan.n,
        sample_steps=plan.sample_steps,
        extractor=plan.extractor,
        progress=progress,
        limit=plan.limit,
    )
    row = asdict(result.rows[0]) | {"metric_label": result.label}
    _write_json(path, row)
    return row


@dataclass
class StudyRow:
    """One trained and scored model: a run of the study with one seed."""

    spec: RunSpec
    summary: dict
    scores: dict
    run_dir: str
    seed: int = 0


def check_seeds(seeds) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(
            f"--seeds {seeds} must be a whole number of at least 1",
            "--seeds 2 trains every run twice (seeds 0 and 1) and reports mean ± std",
        )


def run_dir_of(out: Path, spec: RunSpec, seed: int) -> Path:
    return out / spec.study / spec.name / f"seed-{seed}"


def reproduce(
    budget_minutes: float = 60,
    out: str | os.PathLike = "runs/reproduce",
    n: int = 256,
    sample_steps: int = 20,
    force: bool = False,
    progress: bool = True,
    console=None,
    image_model: str = "unet-kanji",
    chiro_model: str = "chirodiff",
    batch_size: int = 16,
    lr: float = 2e-3,
    chiro_lr: float = 2e-3,
    updates: int = 10,
    limit: int | None = None,
    extractor: str | None = None,
    only: Sequence[str] | None = None,
    steps: tuple[int, int] | None = None,
    seeds: int | None = None,
    eta: float | None = None,
    ema: float | None = None,
) -> Path:
    """Run (or resume) the study in ``out``; returns the path of its report (``README.md``).

    ``steps`` = (steps per image run, steps per ChiroDiff run) skips the calibration and the budget's share-out.
    ``seeds`` = K trains every run with seeds 0..K-1 (default 1; a resumed study keeps its plan's).
    ``only`` restricts the study to the named runs; ``limit`` uses only the first N examples of each split.
    ``eta`` (DDIM's η, default 0) and ``ema`` (EMA decay, default none) apply to every run, training and scoring;
    a resumed study keeps its plan's.
    """
    import shutil

    if budget_minutes <= 0 or not math.isfinite(budget_minutes):
        raise UsageError(f"--budget-minutes {budget_minutes:g} must be positive", "e.g. --budget-minutes 60")
    if n < 2:
        raise UsageError(f"--n {n}: FID/KID need at least 2 samples", "the default is 256")
    if seeds is not None:
        check_seeds(seeds)
    if eta is not None and not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise UsageError(f"--eta {eta} must be in [0, 1]", "0 is deterministic DDIM, 1 samples like DDPM")
    if ema is not None and not (isinstance(ema, (int, float)) and 0.0 < ema < 1.0):
        raise UsageError(f"--ema {ema} must be in (0, 1)", "e.g. --ema 0.995 (the demo's)")
    if steps is not None and min(steps) < 1:
        raise UsageError(f"--steps {min(steps)} must be at least 1", "e.g. --steps 1000, or give --budget-minutes")
    runs = study_runs()
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise UsageError(f"unknown run(s): {', '.join(unknown)}", f"choose from: {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in set(only)]
    out = Path(out)
    plan_path = out / "plan.json"
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"{out} exists and is not a folder", "choose another --out")
    if force and out.exists():
        shutil.rmtree(out)
    if out.is_dir() and any(out.iterdir()) and not plan_path.is_file():
        raise SurgeonError(f"{out} holds something other than a study", "choose another --out, or pass --force")
    started = time.perf_counter()
    if plan_path.is_file():
        plan = _load_plan(plan_path)
        if seeds is not None and seeds != plan.seeds:
            raise SurgeonError(
                f"the study in {out} was planned with --seeds {plan.seeds}, not {seeds}",
                f"re-run with --seeds {plan.seeds} (or without it) to resume, or pass --force to start over",
            )
        for flag, given, planned in (("--eta", eta, plan.eta), ("--ema", ema, plan.ema)):
            if given is not None and given != planned:
                raise SurgeonError(
                    f"the study in {out} was planned with {flag} {planned}, not {given}",
                    f"re-run without {flag} to resume, or pass --force to start over",
                )
        runs = [r for r in study_runs() if r.name in plan.runs]
        if console is not None:
            console.print(f"resuming the study in {out} ({plan.image_steps} steps per image run; --force starts over)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        plan = make_plan(
            budget_minutes,
            out,
            n,
            sample_steps,
            image_model,
            chiro_model,
            batch_size,
            lr,
            chiro_lr,
            updates,
            limit,
            extractor,
            runs,
            steps,
            console,
            seeds or 1,
            0.0 if eta is None else float(eta),
            None if ema is None else float(ema),
        )
        _write_json(plan_path, asdict(plan))
    # every model is trained before any is scored: an interrupted study resumes per (run, seed) either way
    # seed-major: a study stopped early has every run with seed 0 before any with seed 1
    jobs = [(spec, seed, run_dir_of(out, spec, seed)) for seed in range(plan.seeds) for spec in runs]
    summaries = []
    for i, (spec, seed, run_dir) in enumerate(jobs, 1):
        if console is not None:
            console.print(f"[bold]train {i}/{len(jobs)} {spec.name} seed {seed}[/]")
        summaries.append(_train(spec, plan, seed, run_dir, progress))
    rows = []
    for i, ((spec, seed, run_dir), summary) in enumerate(zip(jobs, summaries), 1):
        if console is not None:
            console.print(f"[bold]score {i}/{len(jobs)} {spec.name} seed {seed}[/]")
        rows.append(StudyRow(spec, summary, _score(run_dir, plan, progress), str(run_dir), seed))
    elapsed = time.perf_counter() - started
    from surgeon.study.report import write_report

    return write_report(out, plan, rows, elapsed)
