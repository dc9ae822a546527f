"""The two mask parametrizations. Each maps the original weight W to the effective weight used in every forward.

Each also carries what it was planned for (the plan it was injected from and its own layer's entry), so the
model's plan is read from its masks: nothing about the masking is stored on the model itself.

Mask    fixed bool buffer; effective = W ⊙ mask, held in the stored tensor itself: W is exactly 0 at pruned
        positions, so the forward reads W as it is (no copy kept for backward) and only its gradient is masked, so
        W stays 0 there under AdamW (moments start at 0, see only zero gradients, and weight decay is a product).
        Everything that writes W from outside (inject, load_state_dict, a mask update, EMA) re-zeros it.
        Where the gradient is masked: on the parameter inject registered it for, in place, as each gradient
        accumulates into ``.grad`` (a post-accumulate-grad hook, :func:`~surgeon.masking.zeroing.keep_only_`: 9x cheaper on CPU than
        masking a copy in the autograd graph; it runs before DDP's reducer reads the gradient; at RigL's capture
        steps it leaves the whole gradient for :meth:`Mask.take_dense_grad`); for any other tensor (FSDP2's
        gathered weight, a copy of the model, a parameter swapped in by the caller), inside the autograd graph
        (``_MaskedGradient``).
NMMask  N:M straight-through: effective = S(W) keeps the N largest |w| of every M along the reduction dimension,
        recomputed each forward; backward passes the gradient straight through to W, plus the SR-STE term
        λ_W·(W − S(W)) when λ_W > 0 (SparseDM eq. 9, after Zhou et al., 2021).
        S(W) is made by the rank kernel (:mod:`surgeon.sparsity.nm_ranks`: about one read of W and one write of
        S(W), no copy of W in group order). Only W is kept for backward: inside a module's training forward S(W) is
        written into a recycled block, and what the layer's op saves of it is replaced by (W, N, M) and recomputed
        at unpack (:mod:`surgeon.masking.recompute`), so training holds no second copy of the masked weights; the
        SR-STE term recomputes its mask from W in backward rather than saving a bool one. Gradients are bit for bit
        those of saving S(W).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from surgeon.masking.recompute import effective_weight
from surgeon.masking.zeroing import keep_only_
from surgeon.sparsity.patterns import nm_decay_pruned, nm_mask

if TYPE_CHECKING:
    from surgeon.masking.plan import LayerPlan, Plan


class Mask(nn.Module):
    mask: torch.Tensor  # a buffer: nn.Module's attribute lookup alone would type it Tensor | Module

    def __init__(
        self, mask: torch.Tensor, plan: Plan | None = None, layer: LayerPlan | None = None, adopt: bool = False
    ):
        super().__init__()
        self.plan, self.layer = plan, layer
        # a copy: DST updates the buffer in place, which must never write through to the caller's tensor;
        # ``adopt``: a bool tensor nobody else holds (inject's own initial mask) is taken as it is
        keep = mask.detach()
        self.register_buffer("mask", keep if adopt and keep.dtype == torch.bool else keep.to(torch.bool, copy=True))
        # RigL needs dL/dW_effective at every position, pruned ones included; the gradient reaching the original
        # is masked, so at update steps the hook leaves it whole until take_dense_grad (the autograd path instead
        # sums what flows into the effective weight into dense_grad before masking it).
        self.capture_grad = False
        self.dense_grad: torch.Tensor | None = None
        # set by inject while it registers this mask: right_inverse zeros that one tensor (the module's own weight)
        # in place, instead of allocating a zeroed copy of it; not even that when a loader has just written it
        # with zeros wherever the mask prunes
        self.adopting: torch.Tensor | None = None
        self.adopting_zeroed = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and w.requires_grad):
            return w  # no backward: W itself (a no_grad view of a leaf would carry requires_grad without a grad_fn)
        if self.masks_gradient_of(w):
            return w  # its hook masks the gradient as it accumulates (at a capture step: take_dense_grad does)
        return _MaskedGradient.apply(w, self)

    def mask_gradient_of(self, param: nn.Parameter, module: nn.Module, name: str) -> None:
        """Mask ``param.grad`` in place each time a gradient accumulates into it, for as long as ``param`` is the
        original of ``module.parametrizations[name]`` (the list this mask belongs to)."""
        self.release_gradient()
        handle = param.register_post_accumulate_grad_hook(self._mask_accumulated)
        _GRADIENT_HOOKS[self] = (weakref.ref(param), weakref.ref(module), name, handle)

    def release_gradient(self) -> None:
        hooked = _GRADIENT_HOOKS.pop(self, None)
        if hooked is not None:
            hooked[3].remove()

    def masks_gradient_of(self, w: torch.Tensor) -> bool:
        hooked = _GRADIENT_HOOKS.get(self)
        return hooked is not None and hooked[0]() is w

    def _mask_accumulated(self, param: torch.Tensor) -> None:
        hooked = _GRADIENT_HOOKS.get(self)
        module = hooked[1]() if hooked is not None else None
        plists = getattr(module, "parametrizations", None)
        if plists is None or hooked is None or hooked[2] not in plists or plists[hooked[2]].original is not param:
            # unparametrized behind surgeon's back (torch's remove_parametrizations): a plain weight again
            self.release_gradient()
            return
        if self.capture_grad or param.grad is None:
            return  # a capture step: the whole sum stays in .grad until take_dense_grad
        keep_only_(param.grad, self.mask)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """What is stored for a weight given to the parametrization (registering it, or assigning the weight):
        W with its pruned entries set to 0 (a copy: an assigned tensor stays the caller's)."""
        if w is self.adopting:
            return w if self.adopting_zeroed else keep_only_(w, self.mask)
        return keep_only_(w.clone(), self.mask)

    def take_dense_grad(self, param: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """After a capture step's backward: dL/dW_effective at every position (summed over micro-batches), and
        whether it is already averaged over processes (DDP reduced the hooked parameter's whole gradient).
        (None, False) when this layer saw no backward.

        The hooked parameter's gradient is returned itself, not copied (a 3.4 GB copy of fresh memory took 8-10 s
        of an SD-1.5 RigL update on a CPU): so the optimizer steps on the whole gradient at this one step. AdamW is
        elementwise, so the kept positions come out exactly as from the masked gradient, and the mask update that
        follows zeroes the weight, optimizer state and EMA at every position not active both before and after it
        (:meth:`surgeon.algorithms.dst.MagRan.after_optimizer_step`); the loop drops ``.grad`` after the step
        (``zero_grad(set_to_none=True)``), which leaves this tensor to the update alone."""
        if self.dense_grad is not None:  # captured in the autograd graph, by this process alone
            return self.dense_grad, False
        if param.grad is None or not self.masks_gradient_of(param):
            return None, False
        return param.grad.detach(), True

    def _accumulate_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        return self.mask

    def extra_repr(self) -> str:
        return f"density={self.mask.float().mean().item():.4f}"


# Mask -> (weakref to the hooked parameter, weakref to its module, tensor name, hook handle). Outside the module's
# attributes so that a copy of the model (copy.deepcopy, which does not copy a tensor's hooks) starts unhooked and
# masks in the graph, and can never remove its original's hook.
_GRADIENT_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
        # SR-STE saves W itself (the parameter: no copy); the mask is recomputed from it in backward
        ctx.save_for_backward(w if lambda_w > 0 else None)
        ctx.n, ctx.m, ctx.lambda_w = n, m, lambda_w
        return effective_weight(w, n, m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        if ctx.lambda_w > 0:
            # SR-STE: λ_W·(W − S(W)) is λ_W·W at pruned positions, 0 at kept ones
            grad = nm_decay_pruned(grad, w, ctx.n, ctx.m, ctx.lambda_w)
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
