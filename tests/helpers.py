"""Helpers the test modules share: data folders on disk, the command line in-process, and the one check of an
error's shape."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner, Result

CATCH_ALL_HINT = "SURGEON_DEBUG"  # the hint of an exception no code named: a refusal a test expects is never it


def write_images(folder: Path, n: int = 16, size: int = 16, seed: int = 0) -> Path:
    """``n`` seeded random grayscale PNGs of ``size``×``size`` in ``folder`` (created); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder


def invoke(*args, **kwargs) -> Result:
    """The ``surgeon`` command run in-process, e.g. ``invoke("sparsify", "tiny-unet", "--steps", 2)`` (arguments
    pass through ``str``); ``kwargs`` go to ``CliRunner.invoke``."""
    from surgeon.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def assert_one_error(result: Result, *words: str, hint: Iterable[str] = (), code: int = 1) -> tuple[str, str]:
    """The one shape of a refusal: exit status ``code``, no traceback, and on stderr exactly two non-empty lines,
    ``error: ...`` holding every one of ``words`` and then ``hint: ...`` holding every one of ``hint`` (its own
    hint, not the catch-all's). Returns the two lines."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    error, hint_line = lines
    assert error.startswith("error: ") and hint_line.startswith("hint: "), result.stderr
    for w in words:
        assert w in error, error
    assert CATCH_ALL_HINT not in hint_line, f"reached the catch-all: {error}"
    for w in hint:
        assert w in hint_line, hint_line
    return error, hint_line


def swap_two_bits(file: Path, tensor: str) -> None:
    """Swap two differing bits inside one byte of ``tensor``'s data: same length, same set-bit count."""
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    for i in range(8 + n + start, 8 + n + end):
        b = raw[i]
        for bit in range(7):
            if ((b >> bit) & 1) != ((b >> (bit + 1)) & 1):
                raw[i] = b ^ (0b11 << bit)
                file.write_bytes(bytes(raw))
                return
    raise AssertionError("no byte with two differing bits")


# a user module (file.py:Class) whose forward runs but returns the wrong shape: its first training batch fails
WRONG_SHAPE = '''
import torch
from torch import nn


class HalfWidth(nn.Module):
    """An image denoiser whose output is half as wide as its input."""

    def __init__(self):
        super().__init__()
        self.config = {"sample_size": 16, "in_channels": 1}
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)[..., :8]
'''
