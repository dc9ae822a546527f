"""The ``surgeon`` command. Each command lives in its own module and is registered below with one line."""

from __future__ import annotations

from typing import Annotated

import typer

from surgeon import __version__
from surgeon.cli import eval as eval_cmd
from surgeon.cli import export as export_cmd
from surgeon.cli import finetune as finetune_cmd
from surgeon.cli import inspect as inspect_cmd
from surgeon.cli import prune as prune_cmd
from surgeon.cli import reproduce as reproduce_cmd
from surgeon.cli import sparsify as sparsify_cmd
from surgeon.cli.common import SurgeonGroup

app = typer.Typer(
    name="surgeon",
    cls=SurgeonGroup,
    help="Model surgery for diffusion models: masks on weights, sparse training, packed saving, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Model surgery for diffusion models."""


# commands: one line each
app.command("export")(export_cmd.export)
app.command("inspect")(inspect_cmd.inspect)
app.command("sparsify")(sparsify_cmd.sparsify)
app.command("eval")(eval_cmd.eval_models)
app.command("finetune")(finetune_cmd.finetune)
app.command("prune")(prune_cmd.prune)
app.command("reproduce")(reproduce_cmd.reproduce)


def main() -> None:
    app(prog_name="surgeon")


if __name__ == "__main__":
    main()
