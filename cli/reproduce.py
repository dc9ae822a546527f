"""``surgeon reproduce``: the sparse-to-sparse study on KanjiVG (images and ChiroDiff strokes) in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import Force


def reproduce(
    budget_minutes: Annotated[
        float, typer.Option("--budget-minutes", help="Wall-clock budget; it decides the training steps.")
    ] = 60,
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FOLDER", help="Study folder; re-running resumes it.")
    ] = Path("runs/reproduce"),
    n: Annotated[int, typer.Option("--n", help="Samples scored per model (FID/KID).")] = 256,
    sample_steps: Annotated[int, typer.Option("--sample-steps", help="DDIM sampling steps for scoring.")] = 20,
    extractor: Annotated[
        str | None, typer.Option("--extractor", help="Feature extractor, as for surgeon eval.")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", metavar="RUN", help="Run only these runs (repeatable), e.g. dense, rigl-s0.9-p0.05."),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            show_default=False,
            help="Train every run K times (seeds 0..K-1) and report mean ± std; a finding counts only when "
            "Welch's t-test over the seeds resolves it. Default 1 (a resumed study keeps its own).",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            show_default=False,
            help="Training steps per run, instead of sharing out --budget-minutes by a calibration.",
        ),
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option(
            "--eta",
            show_default=False,
            help="DDIM's eta in [0, 1] for every run's samples and scoring (0 deterministic, 1 DDPM's noise at "
            "every step). Default 0 (a resumed study keeps its own).",
        ),
    ] = None,
    ema: Annotated[
        float | None,
        typer.Option(
            "--ema",
            show_default=False,
            help="EMA decay of the weights for every run (e.g. 0.995); the EMA weights are saved and scored. "
            "Default: no EMA (a resumed study keeps its own).",
        ),
    ] = None,
    force: Force = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Dense vs Static/RigL/MagRan at S = 0.25-0.9 (and p = 0.05 vs 0.5 at S = 0.9) on KanjiVG glyphs, then a short
    ChiroDiff comparison; every model scored by FID, KID, held-out loss, parameters and FLOPs, in a markdown report."""
    from rich.console import Console

    from surgeon.study.reproduce import reproduce as run

    console = Console()
    report = run(
        budget_minutes,
        out,
        n=n,
        sample_steps=sample_steps,
        force=force,
        progress=progress,
        console=console,
        extractor=extractor,
        only=only,
        seeds=seeds,
        eta=eta,
        ema=ema,
        steps=None if steps is None else (steps, steps),
    )
    console.print(report.read_text(), soft_wrap=True, markup=False, highlight=False)
    console.print(f"report: {report}")
