"""One error type for everything a user can get wrong.

A SurgeonError carries a one-line message (what was wrong) and a hint (what to do). The CLI prints both and
exits 1; library callers catch it like any exception.
"""

from __future__ import annotations


class SurgeonError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(SurgeonError):
    """A malformed option or argument value: the CLI exits 2, like click's usage errors."""

    exit_code = 2


class Interrupted(SurgeonError):
    """Ctrl-C: the CLI exits 130 (128 + SIGINT), as shells expect."""

    exit_code = 130


class ArgumentError(SurgeonError, TypeError):
    """A Python API argument of the wrong type, named: a one-line SurgeonError that is also a TypeError."""


def check_arg(value, types: type | tuple[type, ...], name: str, expected: str, hint: str | None = None) -> None:
    """Raise :class:`ArgumentError` naming ``name`` unless ``value`` is one of ``types`` (a bool is never a number)."""
    numeric = types in (int, float) or (isinstance(types, tuple) and set(types) & {int, float})
    if isinstance(value, types) and not (numeric and isinstance(value, bool)):
        return
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ArgumentError(
        f"{name} must be {expected}, got {type(value).__name__} {shown}", hint or f"pass {expected} as {name}"
    )


MODULE_HINT = "pass the module itself, e.g. surgeon.load_model('tiny-unet'), not its name"
PATH_HINT = "pass a str or pathlib.Path"


def check_module(model, name: str = "model") -> None:
    from torch import nn

    check_arg(model, nn.Module, name, "a torch.nn.Module", MODULE_HINT)


def check_path(path, name: str) -> None:
    import os

    check_arg(path, (str, os.PathLike), name, "a path", PATH_HINT)


def brief(exc: BaseException) -> str:
    """An exception as one short line: library messages often span many lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
