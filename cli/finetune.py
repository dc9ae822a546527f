"""``surgeon finetune [MODEL] --nm 2:4 --teacher DENSE --data DATA``: SparseDM N:M fine-tuning under Accelerate."""

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
    NMTarget,
    Resume,
    Samples,
    Seed,
    ShowProgress,
    Steps,
    TrustCode,
    run_out,
    training_overrides,
)
from surgeon.errors import UsageError
from surgeon.recipe import load_recipe, split_stages
from surgeon.sparsity.patterns import parse_nm


def _stages(value: str | None) -> list[str] | None:
    if value is None:
        return None
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    for p in patterns:
        try:
            parse_nm(p)
        except Exception as e:  # noqa: BLE001 - parse_nm's own errors and int() failures alike become one usage error
            raise UsageError(f"--stages: {getattr(e, 'message', e)}", "write e.g. --stages 7:8,3:4,2:4") from None
    return patterns


def finetune(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODEL]",
            show_default=False,
            help="The student's starting point (default: a copy of the teacher). Any model reference (folder, "
            "file.py:Class, preset); its target tensors must match the teacher's.",
        ),
    ] = None,
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            "-t",
            show_default=False,
            help="The trained dense model: any model reference, or one .safetensors file (architecture from its "
            "metadata, a config.json beside it, or MODEL).",
        ),
    ] = ...,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            metavar="PRUNED",
            show_default=False,
            help="Start from a model pruned by `surgeon prune` to the recipe's pattern: its mask and weights.",
        ),
    ] = None,
    nm: NMTarget = None,
    data: Data = "kanjivg",
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            "-r",
            help="sparsedm (SR-STE + distillation), sr-ste, ste, asp, one-shot, sparsegpt-2of4, wanda-2of4, "
            "sparsegpt+sparsedm, or a YAML path.",
        ),
    ] = "sparsedm",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: runs/MODEL-RECIPE-NofM).", show_default=False),
    ] = None,
    steps: Steps = None,
    lr: LearningRate = None,
    batch_size: BatchSize = None,
    lambda_w: Annotated[float | None, typer.Option("--lambda-w", help="SR-STE decay λ_W of pruned weights.")] = None,
    lambda_1: Annotated[
        float | None, typer.Option("--lambda-1", help="Weight of the teacher term ‖F_s − F_t‖².")
    ] = None,
    lambda_2: Annotated[float | None, typer.Option("--lambda-2", help="Weight of the ε term ‖ε − F_s‖².")] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            metavar="N:M,...",
            help="Progressive patterns that tighten, e.g. 7:8,3:4,2:4; the steps are split evenly.",
        ),
    ] = None,
    stage_teacher: Annotated[
        str | None,
        typer.Option(
            "--stage-teacher",
            help="With --stages: dense (the teacher throughout) or previous (each stage learns from the one before).",
        ),
    ] = None,
    seed: Seed = None,
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
    """Fine-tune a trained dense model into an N:M-sparse one (SparseDM: straight-through N:M, SR-STE,
    distillation from the frozen dense teacher) and save it with its N:M masks."""
    from surgeon.training.run import finetune as run

    r = load_recipe(recipe)
    changes = {
        "nm": nm,
        "lambda_w": lambda_w,
        "distill.lambda_1": lambda_1,
        "distill.lambda_2": lambda_2,
        "distill.teacher": stage_teacher,
        **training_overrides(steps, lr, batch_size, seed, mixed_precision, grad_accum, ema, include, exclude),
    }
    patterns = _stages(stages)
    if patterns is not None:
        changes["stages"] = split_stages(patterns, steps if steps is not None else r.training.steps)
        changes["nm"] = nm or patterns[-1]
    r = r.override(**changes)
    tag = f"-{r.nm.replace(':', 'of')}" if r.nm else ""  # no N:M pattern: run.finetune says why
    out = run_out(out, resume, model or init or teacher, recipe, tag)
    summary = run(
        teacher,
        data,
        out,
        r,
        model=model,
        limit=limit,
        force=force,
        resume=resume,
        progress=progress,
        samples=samples,
        trust_code=trust_code,
        init=init,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        from surgeon.evaluation.tables import print_summary

        print_summary([summary], title="surgeon finetune")
        print_nm(summary.nm)


def print_nm(nm: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(
        f"{nm['pattern']}: {nm['nm_valid']} of {nm['layers']} target layers are N:M-valid "
        f"({nm['nm_valid_fraction']:.0%}); {len(nm['left_dense'])} left dense",
        highlight=False,
    )
    for name, reason in nm["left_dense"].items():
        console.print(f"  dense: {name} ({reason})", highlight=False, soft_wrap=True)
