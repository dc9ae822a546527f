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


def brief(exc: BaseException) -> str:
    """An exception as one short line: library messages often span many lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
