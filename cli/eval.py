"""``surgeon eval MODEL... --data DATA``: FID/KID, held-out loss, parameters and FLOPs of one or more models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import Force, JsonOutput, TrustCode


def eval_models(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL...",
            show_default=False,
            help="Models to compare: run folders of surgeon sparsify/finetune, folders saved by surgeon, diffusers "
            "model folders or presets.",
        ),
    ],
    data: Annotated[
        str, typer.Option("--data", "-d", help="'kanjivg' (built in) or a folder with a validation/ split.")
    ] = "kanjivg",
    n: Annotated[int, typer.Option("--n", help="Samples generated per model.")] = 2048,
    metrics: Annotated[
        str, typer.Option("--metrics", help="Comma-separated: fid, kid, pr (improved precision/recall, k = 3).")
    ] = "fid,kid,pr",
    sample_steps: Annotated[int, typer.Option("--sample-steps", help="DDIM sampling steps.")] = 50,
    clip_sample: Annotated[
        bool | None,
        typer.Option(
            "--clip-sample/--no-clip-sample",
            show_default=False,
            help="Clip the predicted x0 to [-1, 1] at every sampling step, or not, overriding the model's recorded "
            "setting. Default: the recorded one (pixel-space images clip; latent and sequence models do not).",
        ),
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option(
            "--eta",
            show_default=False,
            help="DDIM's eta in [0, 1] (0 deterministic, 1 DDPM's noise at every step), overriding the model's "
            "recorded diffusion.eta. Default: the recorded one (0 when none is recorded).",
        ),
    ] = None,
    extractor: Annotated[
        str | None,
        typer.Option(
            "--extractor",
            help="inception-v3-compat (needs its weights on disk) or efficientnet-lite0 (offline; its FID "
            "is not comparable with Inception FID). Default: Inception if available.",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FOLDER", help="Folder for sample grids, plots and results.json.")
    ] = Path("runs/eval"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling noise.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per sampling batch.")] = 64,
    group: Annotated[
        bool,
        typer.Option(
            "--group",
            help="The MODELs are runs of one configuration (its seeds): also report mean ± std of every metric.",
        ),
    ] = False,
    force: Force = False,
    trust_code: TrustCode = False,
    json_output: JsonOutput = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Score MODELs' samples against the held-out data (FID, KID) next to their loss, parameters and FLOPs."""
    from surgeon.evaluation.evaluate import evaluate
    from surgeon.evaluation.tables import eval_table, group_line, wide_console

    console = wide_console()
    result = evaluate(
        models,
        data=data,
        n=n,
        metrics=metrics,
        sample_steps=sample_steps,
        clip_sample=clip_sample,
        eta=eta,
        extractor=extractor,
        out=out,
        force=force,
        seed=seed,
        batch_size=batch_size,
        progress=progress and not json_output,
        console=None if json_output else console,
        trust_code=trust_code,
        group=group,
    )
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    console.print(eval_table(result))
    if result.group:
        console.print(group_line(result), soft_wrap=True)
    for name, path in result.plots.items():
        console.print(f"{name}: {path}", soft_wrap=True)
