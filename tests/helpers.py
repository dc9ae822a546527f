"""Helpers the test modules share: data folders on disk, the command line in-process, and the one check of an
error's shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int = 16, size: int = 16, seed: int = 0) -> Path:
    """``n`` seeded random grayscale PNGs of ``size``×``size`` in ``folder`` (created); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder
