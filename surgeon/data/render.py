"""Rasterize stroke sequences and tile images into PNG sample grids.

Convention: **white strokes on a black background** (uint8 255 on 0). Glyph images for diffusion training are
light strokes on a dark background, mapped to [-1, 1] later (background -1, ink +1). Coordinates follow the
image (and SVG) convention: x grows to the right, y grows downwards; [-1, 1] maps onto the image inside a margin.

Strokes are drawn as polylines with round joins and caps, at ``SUPERSAMPLE``x resolution and box-filtered down,
which anti-aliases thin lines well enough for 32-64 px glyphs while staying fast (Pillow does the drawing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["default_line_width", "render_grid", "render_sequence", "split_strokes"]

SUPERSAMPLE = 4


def default_line_width(size: int) -> float:
    """Line width in pixels: about KanjiVG's own stroke weight relative to the glyph, never thinner than 1.5 px."""
    return max(1.5, 0.04 * size)


def split_strokes(seq: np.ndarray) -> list[np.ndarray]:
    """``[L, 3]`` (x, y, pen) → list of ``[K, 2]`` strokes; pen = 1 ends a stroke (a missing final 1 is implied)."""
    ends = np.flatnonzero(seq[:, 2] > 0.5) + 1
    strokes = np.split(seq[:, :2], ends)
    return [s for s in strokes if len(s)]


def render_sequence(
    seq: np.ndarray | torch.Tensor,
    size: int = 64,
    line_width: float | None = None,
    margin: float = 0.1,
) -> np.ndarray:
    """Draw a ``[L, 3]`` (x, y, pen) sequence with coordinates in [-1, 1] into a uint8 ``[size, size]`` image.

    ``margin`` is the fraction of the image left empty on each side (around the [-1, 1] box; the line's own
    half-width can reach into it). Points outside [-1, 1] are drawn where they fall, clipped by the image border.
    """
    seq = seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else np.asarray(seq)
    if seq.ndim != 2 or seq.shape[1] != 3:
        raise ValueError(f"expected a [L, 3] (x, y, pen) sequence, got shape {tuple(seq.shape)}")
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    width = (default_line_width(size) if line_width is None else float(line_width)) * SUPERSAMPLE
    big = size * SUPERSAMPLE
    lo, span = margin * big, (1 - 2 * margin) * big
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    radius = width / 2
    for stroke in split_strokes(seq.astype(np.float64)):
        # Pixel i covers [i, i + 1), so [-1, 1] maps onto [lo, lo + span]; Pillow addresses pixel centres (-0.5).
        pts = lo + (stroke + 1.0) / 2.0 * span - 0.5
        if len(pts) > 1:
            draw.line(pts.ravel().tolist(), fill=255, width=max(1, round(width)))
        # A disc on every vertex gives round joins and caps (and a dot for a one-point stroke); much faster than
        # Pillow's joint="curve", which is pure Python. Its ellipse box includes both corner pixels: half a pixel in.
        for x, y in pts.tolist():
            draw.ellipse((x - radius + 0.5, y - radius + 0.5, x + radius - 0.5, y + radius - 0.5), fill=255)
    return np.array(canvas.reduce(SUPERSAMPLE), dtype=np.uint8)  # a writable copy (torch warns on read-only)


def render_grid(images: Sequence | np.ndarray | torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """Tile uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3) into one PIL image, ``nrow`` per row."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    elif not isinstance(images, np.ndarray):
        images = np.stack(
            [im.detach().cpu().numpy() if isinstance(im, torch.Tensor) else np.asarray(im) for im in images]
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"render_grid expects uint8 images, got {images.dtype}; map [-1, 1] floats with "
            "((x + 1) * 127.5).round().clip(0, 255) first"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"expected a non-empty [N, H, W] or [N, H, W, C] stack with C in (1, 3), got {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = im
    return Image.fromarray(grid[..., 0] if c == 1 else grid)  # uint8 [H, W] → "L", [H, W, 3] → "RGB"
