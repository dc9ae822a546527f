"""Pictures of runs and evaluations (matplotlib, headless): loss curves, sample grids side by side, FID plots.

Every function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from surgeon.io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def read_losses(metrics_path: str | os.PathLike) -> tuple[list[int], list[float], list[int]]:
    """(steps, training losses, steps of mask updates) from a run's ``metrics.jsonl``."""
    steps, losses, updates = [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec and rec["loss"] is not None and math.isfinite(rec["loss"]):
            steps.append(int(rec["step"]))
            losses.append(float(rec["loss"]))
        if "mask_update" in rec:
            updates.append(int(rec["step"]))
    return steps, losses, updates


def loss_curve(
    metrics_path: str | os.PathLike, out: str | os.PathLike, title: str | None = None, val_loss: float | None = None
) -> Path:
    """Training loss against step (log scale), mask updates as faint vertical lines, the held-out loss as a dot."""
    plt = _pyplot()
    steps, losses, updates = read_losses(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for s in updates:
        ax.axvline(s, color="0.85", lw=0.6, zorder=0)
    ax.plot(steps, losses, marker="." if len(steps) < 40 else None, label="training loss (log window mean)")
    if val_loss is not None and steps:
        ax.plot([steps[-1]], [val_loss], "o", color="C3", label=f"held-out {val_loss:.4f}")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss (MSE on ε)")
    ax.set_title(title or Path(metrics_path).parent.name)
    if updates:
        ax.plot([], [], color="0.85", lw=0.6, label="mask update")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def loss_curves(
    runs: Sequence[tuple[str, str | os.PathLike]], out: str | os.PathLike, title: str = "training loss"
) -> Path:
    """Several runs' training losses on one axis: ``runs`` = [(label, metrics.jsonl path), ...]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for label, path in runs:
        steps, losses, _ = read_losses(path)
        ax.plot(steps, losses, label=label, lw=1.2)
        positive = positive and all(v > 0 for v in losses)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss (MSE on ε)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def grids_side_by_side(
    grids: Sequence[tuple[str, np.ndarray]], out: str | os.PathLike, title: str | None = None
) -> Path:
    """Sample grids (uint8 ``[H, W]`` or ``[H, W, C]``) in one row, each titled with its label."""
    plt = _pyplot()
    n = max(len(grids), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, grid) in zip(axes.flat, grids):
        grid = np.asarray(grid)
        if grid.ndim == 3 and grid.shape[-1] == 1:
            grid = grid[..., 0]
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def metric_vs(
    points: Sequence[dict],
    x: str,
    y: str,
    out: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    dense: float | None = None,
    title: str | None = None,
    log_x: bool = False,
) -> Path:
    """``y`` against ``x`` for the points of each method (``point["method"]``), with a horizontal dense reference
    line at ``dense``; points are dicts with keys x, y, "method" and optional "label"."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(dict.fromkeys(p["method"] for p in points))
    markers = "os^Dv<>P*"
    for i, method in enumerate(methods):
        pts = sorted((p for p in points if p["method"] == method and p.get(y) is not None), key=lambda p: p[x])
        if pts:
            ax.plot([p[x] for p in pts], [p[y] for p in pts], marker=markers[i % len(markers)], label=method)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.3g})")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)
