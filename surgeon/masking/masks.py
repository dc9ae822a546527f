"""The two mask parametrizations. Each maps the original weight W to the effective weight used in every forward.

Each also carries what it was planned for (the plan it was injected from and its own layer's entry), so the
model's plan is read from its masks: nothing about the masking is stored on the model itself.

Mask    fixed bool buffer; effective = W ⊙ mask. Gradients reach W only at kept positions.
NMMask  N:M straight-through: effective = S(W) keeps the N largest |w| of every M along the reduction dimension,
        recomputed each forward; backward passes the gradient straight through to W, plus the SR-STE term
        λ_W·(W − S(W)) when λ_W > 0 (SparseDM eq. 9, after Zhou et al., 2021).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from surgeon.sparsity.patterns import nm_mask

if TYPE_CHECKING:
    from surgeon.masking.plan import LayerPlan, Plan


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor, plan: Plan | None = None, layer: LayerPlan | None = None):
        super().__init__()
        self.plan, self.layer = plan, layer
        # a copy: DST updates the buffer in place, which must never write through to the caller's tensor
        self.register_buffer("mask", mask.detach().to(torch.bool, copy=True))
        # RigL needs dL/dW_effective at every position, pruned ones included; the gradient reaching the original
        # is masked, so at update steps the forward hooks the effective weight and sums what flows into it.
        self.capture_grad = False
        self.dense_grad: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = w * self.mask
        if self.capture_grad and out.requires_grad:
            out.register_hook(self._accumulate_dense_grad)
        return out

    def _accumulate_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        return self.mask

    def extra_repr(self) -> str:
        return f"density={self.mask.float().mean().item():.4f}"


class _NMStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, n: int, m: int, lambda_w: float):
        keep = nm_mask(w, n, m)
        ctx.save_for_backward(w if lambda_w > 0 else None, keep if lambda_w > 0 else None)
        ctx.lambda_w = lambda_w
        return w * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, keep = ctx.saved_tensors
        if ctx.lambda_w > 0:
            # SR-STE: λ_W·(W − S(W)) is λ_W·W at pruned positions, 0 at kept ones
            grad = grad + ctx.lambda_w * w * ~keep
        return grad, None, None, None


class NMMask(nn.Module):
    def __init__(self, n: int, m: int, lambda_w: float = 0.0, plan: Plan | None = None, layer: LayerPlan | None = None):
        super().__init__()
        self.plan, self.layer = plan, layer
        self.n, self.m, self.lambda_w = int(n), int(m), float(lambda_w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _NMStraightThrough.apply(w, self.n, self.m, self.lambda_w)

    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        return nm_mask(w, self.n, self.m)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, lambda_w={self.lambda_w}"
