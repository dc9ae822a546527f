"""``surgeon sparsify MODEL --recipe rigl --s 0.5 --data DATA``: sparse-to-sparse training under Accelerate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import (
    BatchSize,
    Data,
    EMADecay,
    Exclude,
    Force,
    GradAccum,
    Include,
    LearningRate,
    Limit,
    MixedPrecision,
    ModelRef,
    Resume,
    Samples,
    Seed,
    ShowProgress,
    Steps,
    TrustCode,
    run_out,
    training_overrides,
)
from surgeon.recipe import load_recipe


def sparsify(
    model: ModelRef,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Shipped recipe (static, rigl, magran, dense) or a YAML path.")
    ] = "rigl",
    data: Data = "kanjivg",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (default: the resumed run's folder, else runs/MODEL-RECIPE-sS).",
            show_default=False,
        ),
    ] = None,
    s: Annotated[float | None, typer.Option("--s", "--sparsity", help="Global sparsity S in [0, 1).")] = None,
    p: Annotated[float | None, typer.Option("--p", help="Prune-and-regrow fraction per mask update.")] = None,
    delta_t: Annotated[int | None, typer.Option("--delta-t", help="Steps between mask updates (ΔT_e).")] = None,
    steps: Steps = None,
    lr: LearningRate = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    distribution: Annotated[
        str | None, typer.Option("--distribution", help="Layer budget: erk, er or uniform.")
    ] = None,
    init: Annotated[
        str | None, typer.Option("--init", help="scratch (re-initialize, the paper's setting) or pretrained.")
    ] = None,
    mixed_precision: MixedPrecision = None,
    grad_accum: GradAccum = None,
    ema: EMADecay = None,
    include: Include = None,
    exclude: Exclude = None,
    limit: Limit = None,
    resume: Resume = None,
    force: Force = False,
    trust_code: TrustCode = False,
    samples: Samples = True,
    progress: ShowProgress = True,
) -> None:
    """Train MODEL sparse from scratch (Static-DM, RigL-DM, MagRan-DM) and save it with packed masks."""
    from surgeon.training.run import sparsify as run

    r = load_recipe(recipe).override(
        **{"sparsity": s, "dst.p": p, "dst.delta_t": delta_t, "distribution": distribution, "init": init},
        **training_overrides(steps, lr, batch_size, seed, mixed_precision, grad_accum, ema, include, exclude),
    )
    out = run_out(out, resume, model, recipe, f"-s{r.sparsity:g}" if r.sparsity else "")
    summary = run(
        model,
        r,
        data,
        out,
        limit=limit,
        force=force,
        resume=resume,
        progress=progress,
        samples=samples,
        trust_code=trust_code,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        from surgeon.evaluation.tables import print_summary

        print_summary([summary])
