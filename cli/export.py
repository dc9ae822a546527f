"""``surgeon export MODEL --format FORMAT --out PATH``: a deployable artifact, and a table of what each layer became."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from surgeon.cli.common import Force, ModelRef, TrustCode
from surgeon.formats import FORMATS

_FORMATS = ", ".join(FORMATS)


def export(
    model: ModelRef,
    format: Annotated[str, typer.Option("--format", "-f", help=f"One of: {_FORMATS}.")] = "dense",  # noqa: A002
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            show_default=False,
            help="Output folder, or a file ending in .safetensors (one self-describing file).",
        ),
    ] = ...,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast floating tensors: fp32, fp16 or bf16.")] = None,
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="dense: write the whole latent pipeline the model came from.")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="semi-structured: one-shot magnitude 2:4 where weights are not 2:4 yet.")
    ] = False,
    layers: Annotated[
        str, typer.Option("--layers", help="csr: auto (converted where measured faster) or all.")
    ] = "auto",
    force: Force = False,
    trust_code: TrustCode = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress while measuring.")] = True,
) -> None:
    """Export REF as dense, packed, semi-structured (2:4) or csr weights; prints what each layer became."""
    from surgeon.formats.exporter import export as run

    result = run(
        model,
        out,
        format=format,
        dtype=dtype,
        force=force,
        pipeline=pipeline,
        prune=prune,
        layers=layers,
        progress=progress,
        trust_code=trust_code,
    )
    console = Console()
    console.print(_table(result))
    stored = sum(r.bytes for r in result.rows)
    sparse = sum(r.runs != "dense" and not r.runs.startswith("dense") for r in result.rows)
    console.print(
        f"{result.format}: {result.out} ({result.file_bytes:,} bytes; target weights {stored:,} bytes; "
        f"{sparse} of {len(result.rows)} run sparse)",
        soft_wrap=True,
        highlight=False,
    )
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for note in result.warnings:
        err.print(Text(f"warning: {note}", style="yellow"))


def _table(result) -> Table:
    table = Table(title=f"surgeon export --format {result.format}", title_justify="left")
    table.add_column("tensor", overflow="fold", ratio=1)
    for name in ("kind", "shape", "storage"):
        table.add_column(name, no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("runs", no_wrap=True)
    table.add_column("note", overflow="fold")
    for r in result.rows:
        table.add_row(r.name, r.kind, "x".join(map(str, r.shape)), r.storage, f"{r.bytes:,}", r.runs, r.note)
    return table
