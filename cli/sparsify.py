"""``surgeon sparsify MODEL --recipe rigl --s 0.5 --data DATA``: sparse-to-sparse training under Accelerate."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from surgeon.checkpoint import run_folder
from surgeon.recipe import load_recipe

from .common import Exclude, Force, Include, ModelRef, TrustCode


def default_out(model: str, recipe: str, sparsity: float | None) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.split(":")[-1]).name or model).strip("-") or "model"
    tag = f"-s{sparsity:g}" if sparsity else ""
    return Path("runs") / f"{stem}-{Path(recipe).stem}{tag}"


def sparsify(
    model: ModelRef,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe (static, rigl, magran, dense) or a YAML path.")] = "rigl",
    data: Annotated[str, typer.Option("--data", "-d", help="'kanjivg' (built in) or a folder of images.")] = "kanjivg",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder [default: the resumed run's folder, else runs/MODEL-RECIPE-sS].", show_default=False)] = None,
    s: Annotated[Optional[float], typer.Option("--s", "--sparsity", help="Global sparsity S in [0, 1).")] = None,
    p: Annotated[Optional[float], typer.Option("--p", help="Prune-and-regrow fraction per mask update.")] = None,
    delta_t: Annotated[Optional[int], typer.Option("--delta-t", help="Steps between mask updates (ΔT_e).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Global batch size.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for masks, data order and noise.")] = None,
    distribution: Annotated[Optional[str], typer.Option("--distribution", help="Layer budget: erk, er or uniform.")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="scratch (re-initialize, the paper's setting) or pretrained.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option("--mixed-precision", help="no, fp16 or bf16 (Accelerate).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", help="EMA decay of the weights (e.g. 0.999); EMA follows the masks.")] = None,
    include: Include = None,
    exclude: Exclude = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N training examples.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Checkpoint file or run folder to continue from.")] = None,
    force: Force = False,
    trust_code: TrustCode = False,
    samples: Annotated[bool, typer.Option("--samples/--no-samples", help="Write a PNG grid of samples at the end.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train MODEL sparse from scratch (Static-DM, RigL-DM, MagRan-DM) and save it with packed masks."""
    from surgeon.run import sparsify as run

    r = load_recipe(recipe).override(**{
        "sparsity": s, "dst.p": p, "dst.delta_t": delta_t, "training.steps": steps, "optimizer.lr": lr,
        "training.batch_size": batch_size, "training.seed": seed, "distribution": distribution, "init": init,
        "training.mixed_precision": mixed_precision, "training.grad_accum": grad_accum, "training.ema_decay": ema,
        "include": include or None, "exclude": exclude or None,
    })
    if out is None:  # a resumed run continues in its own folder
        out = run_folder(resume) if resume else default_out(model, recipe, r.sparsity if r.algorithm != "dense" else None)
    summary = run(model, r, data, out, limit=limit, force=force, resume=resume, progress=progress, samples=samples,
                  trust_code=trust_code)
    from accelerate import PartialState

    if PartialState().is_main_process:
        from surgeon.tables import print_summary

        print_summary([summary])
