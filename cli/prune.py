"""``surgeon prune MODEL --method sparsegpt --nm 2:4 --data DATA``: calibrated one-shot pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import Exclude, Force, Include, ModelRef, NMTarget, ShowProgress, TrustCode, default_out


def prune(
    model: ModelRef,
    method: Annotated[str, typer.Option("--method", "-m", help="magnitude, wanda or sparsegpt.")] = "sparsegpt",
    s: Annotated[
        float | None, typer.Option("--s", "--sparsity", help="Unstructured sparsity S in [0, 1).", show_default=False)
    ] = None,
    distribution: Annotated[
        str, typer.Option("--distribution", help="With --s, the layer budget: uniform, erk or er.")
    ] = "uniform",
    nm: NMTarget = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Calibration data: 'kanjivg' or a folder of images (not for magnitude)."),
    ] = None,
    calib: Annotated[int, typer.Option("--calib", help="Calibration examples, one timestep each.")] = 128,
    timesteps: Annotated[
        str, typer.Option("--timesteps", help="Timestep scheme: uniform, K-stratified (e.g. 8-stratified), weighted.")
    ] = "uniform",
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential/--parallel",
            help="Block by block from the already pruned model, or every layer from the dense model.",
        ),
    ] = True,
    block_size: Annotated[int, typer.Option("--block-size", help="SparseGPT's lazy update block (columns).")] = 128,
    damp: Annotated[float, typer.Option("--damp", help="SparseGPT's damping λ as a fraction of mean diag(H).")] = 0.01,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Calibration batch size.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the calibration examples, timesteps and noise.")] = 0,
    include: Include = None,
    exclude: Exclude = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: runs/MODEL-METHOD-PATTERN).", show_default=False),
    ] = None,
    force: Force = False,
    trust_code: TrustCode = False,
    progress: ShowProgress = True,
) -> None:
    """Prune a trained model once, from calibration data (SparseGPT, Wanda) or by magnitude, and save it with
    fixed masks (unstructured, or N:M along the reduction dimension)."""
    from surgeon.training.prune import prune as run

    tag = f"-{nm.replace(':', 'of')}" if nm else f"-s{s}" if s is not None else ""
    out = out or default_out(model, method, tag)
    result = run(
        model,
        data,
        out,
        method=method,
        sparsity=s,
        nm=nm,
        distribution=distribution,
        calib=calib,
        timesteps=timesteps,
        sequential=sequential,
        block_size=block_size,
        damp=damp,
        batch_size=batch_size,
        seed=seed,
        include=include,
        exclude=exclude,
        force=force,
        progress=progress,
        trust_code=trust_code,
    )
    from rich.console import Console

    from surgeon.masking.inspection import report

    rep = report(result.model, nm=nm or "2:4")
    r = result.report
    mode = "sequential" if r.sequential else "parallel"
    Console().print(
        f"{r.method} ({mode}): {r.layers} layers in {r.blocks} blocks, {r.passes} calibration passes, "
        f"{r.seconds:.1f} s; sparsity {rep.sparsity:.4f}"
        + (f", {rep.totals['nm_valid_layers']} layers {nm}-valid" if nm else "")
        + f"; saved to {result.out}",
        highlight=False,
        soft_wrap=True,
    )
