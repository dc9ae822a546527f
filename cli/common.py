"""What every command shares: option aliases (same names, same help everywhere) and the one error formatter.

Errors: a SurgeonError prints ``error: <message>`` and ``hint: <hint>`` on stderr and exits with its exit_code
(1; 2 for UsageError). A malformed command line (click's usage errors) prints the same two lines and exits 2;
Ctrl-C exits 130. Any other exception prints one line and exits 1;
``SURGEON_DEBUG=1`` adds the full traceback. The formatter sits in the command group, so every command registered
on the app gets it without decorating anything.
"""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from surgeon.errors import Interrupted, SurgeonError, UsageError, brief
from surgeon.sparsity.patterns import parse_nm


def _nm_value(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_nm(value)
    except SurgeonError as e:
        raise UsageError(f"--nm: {e.message}", e.hint) from None
    return value


ModelRef = Annotated[
    str,
    typer.Argument(
        metavar="REF",
        show_default=False,
        help="Model: a diffusers model or pipeline folder, a folder or .safetensors file written by surgeon, "
        "path/to/file.py:Class, "
        "a preset (tiny-unet, unet-kanji, ...) or a hub id.",
    ),
]
Include = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        metavar="GLOB",
        help="Only tensors whose FQN or module name matches this glob (or re:REGEX). Repeatable.",
    ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="GLOB",
        help="Skip tensors whose FQN or module name matches this glob (or re:REGEX). Repeatable.",
    ),
]
NMPattern = Annotated[str, typer.Option("--nm", metavar="N:M", callback=_nm_value, help="N:M pattern, e.g. 2:4.")]
NMTarget = Annotated[
    str | None,
    typer.Option(
        "--nm",
        metavar="N:M",
        callback=_nm_value,
        help="N:M pattern to reach, e.g. 2:4 (default: the recipe's).",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
OutDir = Annotated[Path, typer.Option("--out", "-o", metavar="FOLDER", help="Output folder.", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output folder if it exists.")]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Let a model folder import the Python file or module its config names (runs that code).",
    ),
]


# training options that sparsify and finetune share
Data = Annotated[str, typer.Option("--data", "-d", help="'kanjivg' (built in) or a folder of images.")]
Steps = Annotated[int | None, typer.Option("--steps", help="Training steps.")]
LearningRate = Annotated[float | None, typer.Option("--lr", help="AdamW learning rate.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", help="Global batch size.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for masks, data order and noise.")]
MixedPrecision = Annotated[str | None, typer.Option("--mixed-precision", help="no, fp16 or bf16 (Accelerate).")]
GradAccum = Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")]
EMADecay = Annotated[
    float | None, typer.Option("--ema", help="EMA decay of the weights (e.g. 0.999); EMA follows the masks.")
]
Limit = Annotated[int | None, typer.Option("--limit", help="Use only the first N training examples.")]
Resume = Annotated[Path | None, typer.Option("--resume", help="Checkpoint file or run folder to continue from.")]
Samples = Annotated[bool, typer.Option("--samples/--no-samples", help="Write a PNG grid of samples at the end.")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


def training_overrides(steps, lr, batch_size, seed, mixed_precision, grad_accum, ema, include, exclude) -> dict:
    """The shared options as recipe overrides (None leaves the recipe's value)."""
    return {
        "training.steps": steps,
        "optimizer.lr": lr,
        "training.batch_size": batch_size,
        "training.seed": seed,
        "training.mixed_precision": mixed_precision,
        "training.grad_accum": grad_accum,
        "training.ema_decay": ema,
        "include": include or None,
        "exclude": exclude or None,
    }


def run_out(out: Path | None, resume: Path | None, model: str, recipe: str, tag: str = "") -> Path:
    """The run's folder: ``--out``; else the resumed run's own folder (never another run's); else the default."""
    if out is not None:
        return out
    if resume is not None:
        from surgeon.training.checkpoint import run_folder

        return run_folder(resume)
    return default_out(model, recipe, tag)


def default_out(model: str, recipe: str, tag: str = "") -> Path:
    """``runs/<model>-<recipe><tag>``, e.g. runs/tiny-unet-rigl-s0.5."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.split(":")[-1]).name or model).strip("-") or "model"
    return Path("runs") / f"{stem}-{Path(recipe).stem}{tag}"


def print_error(err: BaseException) -> int:
    """Print ``err`` the one way the CLI prints errors; returns the exit code."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)  # soft_wrap: one line, however long
    if os.environ.get("SURGEON_DEBUG") == "1":
        console.print(Text("".join(traceback.format_exception(err)).rstrip()))
    if isinstance(err, SurgeonError):
        message, hint, code = err.message, err.hint, err.exit_code
    else:
        message, hint, code = f"{type(err).__name__}: {brief(err)}", "set SURGEON_DEBUG=1 to see the traceback", 1
    console.print(Text(f"error: {printable(' '.join(message.split()))}", style="bold red"))
    if hint:
        console.print(Text(f"hint: {printable(hint)}", style="yellow"))
    return code


def printable(text: str) -> str:
    """``text`` as the terminal can show it: bytes of a path that are not valid UTF-8 (surrogate escapes) as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _is_usage_error(err: BaseException) -> bool:
    """Click's usage errors (Typer vendors its own click, whose UsageError it does not export), but not the
    "no arguments: show the help" signal."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names and hasattr(err, "format_message")


class SurgeonGroup(TyperGroup):
    """The app's command group: runs a command and turns what it raises into one formatted error."""

    def invoke(self, ctx: typer.Context):
        try:
            try:
                return super().invoke(ctx)
            except Exception as err:  # a malformed command line: the same two lines as every error, exit 2
                if not _is_usage_error(err):
                    raise
                command = err.ctx.command_path if getattr(err, "ctx", None) is not None else ctx.command_path
                raise UsageError(err.format_message(), f"see `{command} --help`") from None
        except (TyperException, typer.Exit, typer.Abort):  # exits, and Typer's own signals: Typer reports them
            raise
        except BrokenPipeError:  # the reader went away (`surgeon ... | head`): click ends the command quietly
            raise
        except KeyboardInterrupt as err:  # Ctrl-C outside a training loop (which stops at a step boundary itself)
            interrupted = Interrupted(
                "interrupted", "run the command again; a training run continues from its last checkpoint with --resume"
            )
            raise typer.Exit(print_error(interrupted)) from err
        except Exception as err:  # noqa: BLE001 - the one place where every error becomes an exit code
            raise typer.Exit(print_error(err)) from None
