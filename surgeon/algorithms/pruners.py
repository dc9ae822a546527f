"""One-shot pruners: magnitude, Wanda (Sun et al., 2024) and SparseGPT (Frantar & Alistarh, 2023).

Each prunes one weight matrix ``W [rows, columns]`` (the column order of
:func:`surgeon.algorithms.statistics.as_matrix`: N:M groups are M adjacent columns) to a :class:`Pattern` and
returns the new weights and the kept mask. Counts are exact: an unstructured layer keeps exactly ``kept`` weights,
an N:M layer exactly N of every M.

magnitude  keep the largest |W_ij| of the layer (or of each N:M group); no calibration
wanda      keep the largest |W_ij|·‖X_j‖₂ per output row (or per N:M group); weights unchanged
sparsegpt  prune columns left to right with the inverse Hessian of H = 2XXᵀ/n + λI (λ = damp·mean diag H) and
           update the columns not yet visited by the OBS formula, in lazy blocks of ``block_size`` columns. The
           mask is chosen per block (unstructured: the block's share of the layer's pruned count, lowest
           w²/[H⁻¹]²_jj first) or per group as the sweep reaches it (N:M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.algorithms.statistics import InputStats
from surgeon.errors import SurgeonError
from surgeon.sparsity.patterns import nm_mask, topk_mask


@dataclass(frozen=True)
class Pattern:
    """What one layer keeps: exactly ``kept`` weights (unstructured) or N of every M (``nm``)."""

    kept: int | None = None
    nm: tuple[int, int] | None = None


class Pruner:
    name = "base"
    needs = "none"  # the calibration statistics it reads: "none" | "norms" | "hessian"

    def prune(
        self, w: torch.Tensor, stats: InputStats | None, pattern: Pattern, layer: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weights, kept mask) for ``w`` ``[rows, columns]``; ``layer`` names it in errors."""
        raise NotImplementedError


def rowwise_topk(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep ``kept`` entries in all, the largest of each row; rows share them evenly, the first ``kept % rows``
    rows one more (ties → lower index)."""
    rows, cols = scores.shape
    per_row = torch.full((rows,), kept // rows, dtype=torch.long)
    per_row[: kept % rows] += 1
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    rank_kept = torch.arange(cols)[None, :] < per_row[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, rank_kept)


def select(scores: torch.Tensor, pattern: Pattern, rowwise: bool) -> torch.Tensor:
    if pattern.nm is not None:
        return nm_mask(scores, *pattern.nm)  # 2-D: groups of M adjacent columns
    return rowwise_topk(scores, pattern.kept) if rowwise else topk_mask(scores, pattern.kept)


class Magnitude(Pruner):
    name = "magnitude"

    def prune(self, w, stats, pattern, layer):
        keep = select(w.abs(), pattern, rowwise=False)
        return w * keep, keep


class Wanda(Pruner):
    name = "wanda"
    needs = "norms"

    def prune(self, w, stats, pattern, layer):
        scores = w.abs().double() * stats.norms()[None, :].to(w.device)
        keep = select(scores, pattern, rowwise=True)
        return w * keep, keep


class SparseGPT(Pruner):
    name = "sparsegpt"
    needs = "hessian"

    def __init__(self, block_size: int = 128, damp: float = 0.01):
        self.block_size, self.damp = int(block_size), float(damp)

    def prune(self, w, stats, pattern, layer):
        new, keep = sparsegpt(w, stats.hessian(), pattern, self.block_size, self.damp, layer)
        return new.to(w.dtype), keep


def inverse_hessian_factor(h: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """The upper Cholesky factor U of (H + λI)⁻¹ (float64): U_jj² is the inverse Hessian entry of column j once the
    columns before it are fixed, and row j of U carries its OBS update to the columns after it."""
    if not torch.isfinite(h).all():
        raise SurgeonError(
            f"the calibration inputs of {layer} are not finite (inf or nan in its Hessian)",
            "check the model and data: the dense model overflows on them",
        )
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise SurgeonError(
            f"the Hessian of {layer} is singular even with damping {damp:g}·mean(diag)",
            "raise --damp (e.g. 0.1), calibrate on more examples (--calib), or --exclude the layer",
        )
    return upper


def sparsegpt(
    w: torch.Tensor, h: torch.Tensor, pattern: Pattern, block_size: int = 128, damp: float = 0.01, layer: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's sweep (Algorithm 1 of the paper) in float64; returns (new weights, kept mask)."""
    W = w.detach().to(torch.float64).clone()  # noqa: N806
    rows, cols = W.shape
    h = h.to(W.device, torch.float64).clone()
    dead = h.diagonal() == 0  # inputs that were always 0: any weight there is free to prune
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(h, damp, layer)  # noqa: N806
    pruned = torch.zeros_like(W, dtype=torch.bool)
    total_pruned = rows * cols - pattern.kept if pattern.nm is None else 0
    n, m = pattern.nm or (0, 1)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # noqa: N806
        d = U1.diagonal()
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)  # noqa: N806
        P1 = torch.zeros_like(W1, dtype=torch.bool)  # noqa: N806
        if pattern.nm is None:  # this block's exact share of the layer's pruned weights
            k = round(total_pruned * i2 / cols) - round(total_pruned * i1 / cols)
            P1 = topk_mask(-(W1**2) / d[None, :] ** 2, k)  # noqa: N806
        for i in range(i2 - i1):
            if pattern.nm is not None and i % m == 0:
                scores = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
                lowest = torch.sort(scores, dim=1, stable=True).indices[:, : m - n]
                P1[:, i : i + m] = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)
            col = W1[:, i]
            q = torch.where(P1[:, i], torch.zeros_like(col), col)
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBS: the columns not yet visited absorb the error
            Q1[:, i], E1[:, i] = q, err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the lazy update of every later block at once
        pruned[:, i1:i2] = P1
    return W, ~pruned
