"""``surgeon inspect REF``: what every target weight keeps (density, N:M validity, kept params), table or JSON."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from surgeon.cli.common import Exclude, Include, JsonOutput, ModelRef, NMPattern, TrustCode
from surgeon.formats.loading import load_model
from surgeon.masking.inspection import Report, report

_NM_CELL = {True: "yes", False: "no", None: "n/a"}


def inspect(
    ref: ModelRef,
    nm: NMPattern = "2:4",
    json_output: JsonOutput = False,
    include: Include = None,
    exclude: Exclude = None,
    trust_code: TrustCode = False,
) -> None:
    """Per-layer density, N:M validity and kept parameters of a model's target weights, measured."""
    rep = report(load_model(ref, trust_code=trust_code), nm=nm, include=include, exclude=exclude)
    if json_output:
        typer.echo(json.dumps({"model": ref, **rep.to_dict()}, indent=2))
        return
    console = Console()
    console.print(_table(ref, rep))
    t = rep.totals
    pattern = f"{rep.nm[0]}:{rep.nm[1]}"
    console.print(
        f"targets: {t['target_params']:,} params in {len(rep.rows)} tensors, kept {t['kept']:,} "
        f"(density {1 - t['sparsity']:.4f}, sparsity {t['sparsity']:.4f})",
        highlight=False,
    )
    console.print(
        f"model: {t['model_params']:,} params; {pattern} valid in {t['nm_valid_layers']} of "
        f"{t['nm_applicable_layers']} tensors it applies to",
        highlight=False,
    )
    for r in rep.rows:
        if r.nm_reason:
            console.print(f"{pattern} n/a for {r.name}: {r.nm_reason}", highlight=False)


def _table(ref: str, rep: Report) -> Table:
    pattern = f"{rep.nm[0]}:{rep.nm[1]}"
    table = Table(title=f"{ref}: target weights", title_justify="left")
    table.add_column("tensor", overflow="fold", ratio=1)  # long FQNs take the width that is left
    for name in ("kind", "shape", "mask"):
        table.add_column(name, no_wrap=True)
    table.add_column("density", justify="right", no_wrap=True)
    table.add_column(f"{pattern}", no_wrap=True)
    table.add_column("kept", justify="right", no_wrap=True)
    for r in rep.rows:
        table.add_row(
            r.name,
            r.kind,
            "x".join(map(str, r.shape)),
            r.masked or "-",
            f"{r.density:.4f}",
            _NM_CELL[r.nm_valid],
            f"{r.kept:,}",
        )
    return table
