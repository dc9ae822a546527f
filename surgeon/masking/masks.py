"""The two mask parametrizations. Each maps the original weight W to the effective weight used in every forward.

Each also carries what it was planned for (the plan it was injected from and its own layer's entry), so the
model's plan is read from its masks: nothing about the masking is stored on the model itself.

Mask    fixed bool buffer; effective = W ⊙ mask, held in the stored tensor itself: W is exactly 0 at pruned
        positions, so the forward reads W as it is (a view, no copy kept for backward) and the backward masks the
        gradient, so W stays 0 there under AdamW (moments start at 0, see only zero gradients, and weight decay is a
        product). Everything that writes W from outside (inject, load_state_dict, a mask update, EMA) re-zeros it.
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
    mask: torch.Tensor  # a buffer: nn.Module's attribute lookup alone would type it Tensor | Module

    def __init__(self, mask: torch.Tensor, plan: Plan | None = None, layer: LayerPlan | None = None):
        super().__init__()
        self.plan, self.layer = plan, layer
        # a copy: DST updates the buffer in place, which must never write through to the caller's tensor
        self.register_buffer("mask", mask.detach().to(torch.bool, copy=True))
        # RigL needs dL/dW_effective at every position, pruned ones included; the gradient reaching the original
        # is masked, so at update steps the backward sums what flows into the effective weight before masking it.
        self.capture_grad = False
        self.dense_grad: torch.Tensor | None = None
        # set by inject while it registers this mask: right_inverse zeros that one tensor (the module's own weight)
        # in place, instead of allocating a zeroed copy of it
        self.adopting: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and w.requires_grad):
            return w  # no backward: W itself (a no_grad view of a leaf would carry requires_grad without a grad_fn)
        return _MaskedGradient.apply(w, self)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """What is stored for a weight given to the parametrization (registering it, or assigning the weight):
        W with its pruned entries set to 0 (a copy: an assigned tensor stays the caller's)."""
        if w is self.adopting:
            return w.masked_fill_(~self.mask.to(w.device), 0.0)
        return w.masked_fill(~self.mask.to(w.device), 0.0)

    def _accumulate_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        return self.mask

    def extra_repr(self) -> str:
        return f"density={self.mask.float().mean().item():.4f}"


class _MaskedGradient(torch.autograd.Function):
    """Identity forward on a W that is already 0 where pruned; the backward keeps the gradient at kept positions.

    torch.where, not a product, so a non-finite gradient at a pruned position cannot reach W either. At RigL's
    update steps the incoming gradient, dL/dW_effective at every position, is summed into ``dense_grad`` first.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, owner: Mask):
        ctx.save_for_backward(owner.mask)  # a mask changed before backward fails loudly (version counter)
        ctx.owner = owner if owner.capture_grad else None
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if ctx.owner is not None:
            ctx.owner._accumulate_dense_grad(grad)
        return torch.where(mask, grad, 0.0), None


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
