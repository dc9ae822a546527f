"""Inject, remove and fold mask parametrizations. The only module that touches torch.nn.utils.parametrize.

Everything else reaches masked tensors through :func:`sites`, which yields one :class:`Site` per masked tensor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgeon.errors import SurgeonError, check_arg, check_module
from surgeon.masking.masks import Mask, NMMask
from surgeon.masking.plan import LayerPlan, Plan
from surgeon.masking.recompute import recomputed, recomputing
from surgeon.masking.shards import full
from surgeon.masking.zeroing import keep_only_
from surgeon.seeding import generator
from surgeon.sparsity.patterns import random_mask, topk_mask
from surgeon.sparsity.scratch import buffer

INITS = ("random", "magnitude")


@dataclass(frozen=True)
class Site:
    """One masked tensor: ``module.<name>`` is parametrized by a Mask or NMMask."""

    fqn: str
    module: nn.Module
    name: str

    @property
    def parametrization(self) -> Mask | NMMask:
        # torch types the parametrization list as plain modules; a Site is only ever made for ours
        return cast("Mask | NMMask", self.module.parametrizations[self.name][0])

    @property
    def original(self) -> nn.Parameter:
        """The trainable tensor the optimizer sees (dense storage; zero at pruned positions for Mask)."""
        return self.module.parametrizations[self.name].original

    @property
    def mask(self) -> torch.Tensor:
        """The whole mask (a fixed mask is a buffer every rank holds whole; N:M is computed on the gathered W)."""
        p = self.parametrization
        return p.mask if isinstance(p, Mask) else p.current_mask(full(self.original))

    @property
    def is_nm(self) -> bool:
        return isinstance(self.parametrization, NMMask)

    def effective(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace a fixed mask in place (same shape, exact bool); the weights it prunes are set to 0."""
        p = self.parametrization
        if not isinstance(p, Mask):
            raise TypeError(f"{self.fqn} has an N:M mask; it is recomputed every forward")
        p.mask.copy_(mask.to(p.mask.device))
        with torch.no_grad():  # the forward reads the stored tensor: what the new mask prunes must be 0 there now
            keep_only_(self.original, p.mask)


def _split(fqn: str) -> tuple[str, str]:
    module_name, _, name = fqn.rpartition(".")
    return module_name, name


def sites(model: nn.Module) -> dict[str, Site]:
    """``{fqn: Site}`` for every masked tensor of ``model``, in module registration order."""
    out = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            if isinstance(plist[0], (Mask, NMMask)):
                fqn = f"{module_name}.{name}" if module_name else name
                out[fqn] = Site(fqn, module, name)
    return out


def _layer_of(site: Site) -> LayerPlan:
    """What the site's parametrization was planned to keep, or (made outside inject) what its mask keeps."""
    p = site.parametrization
    if p.layer is not None:
        return p.layer
    shape = tuple(site.original.shape)
    if site.is_nm:
        return LayerPlan("other", shape, nm=(p.n, p.m))
    return LayerPlan("other", shape, density=int(torch.count_nonzero(p.mask)) / math.prod(shape))


def masked_fqns(plan: Plan) -> set[str]:
    """The tensors that injecting ``plan`` masks (a planned density of 1 leaves a tensor dense)."""
    return {fqn for fqn, lp in plan.layers.items() if not lp.is_dense}


def get_plan(model: nn.Module) -> Plan | None:
    """The plan the masks of ``model`` were injected from, read from the masks themselves; None if it has none.

    Every mask parametrization carries the plan it was made for (nothing is stored on the model). When all masks
    share one plan and it covers exactly them, that plan is returned (global settings, skipped and dense-planned
    tensors included); otherwise (masks injected from several plans, or made by hand) a plan of the masks it has.
    """
    found = sites(model)
    if not found:
        return None
    plans = {id(s.parametrization.plan): s.parametrization.plan for s in found.values()}
    if len(plans) == 1:
        (only,) = plans.values()
        if only is not None and masked_fqns(only) == set(found):
            return only
    return Plan({fqn: _layer_of(site) for fqn, site in found.items()})


def _rnn_release_flat_weights(module: nn.RNNBase, args, output) -> None:
    """Forward hook on masked RNNs: point ``_flat_weights`` back at the leaf originals after each forward.

    RNNBase caches the tensors it ran with; for parametrized weights those are graph nodes, which would keep the
    autograd graph alive and make ``copy.deepcopy`` fail. The next forward sees the changed reference and
    recomputes the masked weights, so the forward always uses them.
    """
    if not parametrize.is_parametrized(module):
        return
    for i, name in enumerate(module._flat_weights_names):
        if name in module.parametrizations:
            leaf = module.parametrizations[name].original
            module._flat_weights[i] = leaf
            module._flat_weight_refs[i] = weakref.ref(leaf)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class before its parametrizations change.

    parametrize swaps a module's class for a generated ``Parametrized<Class>`` holding one property per
    parametrized tensor, and adds or deletes those properties as tensors are (un)parametrized. ``copy.deepcopy``
    (torch's own, for parametrized modules) keeps that class shared between a copy and its original, so folding
    a copy would delete the original's ``weight``, and injecting into a copy would give the original a property it
    has no tensor for. A fresh class per change keeps every copy independent; no class is ever patched.
    """
    if not parametrize.is_parametrized(module):
        return
    shared = type(module)
    body = {k: v for k, v in shared.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(shared.__name__, shared.__bases__, body)


def _zero_pruned_after_load(plist: parametrize.ParametrizationList, incompatible_keys) -> None:
    """load_state_dict post hook: the forward reads the stored tensor as it is, so a loaded one is re-zeroed where
    pruned (its mask, a child buffer, is loaded first), whatever the state dict held there."""
    with torch.no_grad():
        keep_only_(plist.original, plist[0].mask)


def _initial_mask(w: torch.Tensor, lp: LayerPlan, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "random":
        return random_mask(w.shape, lp.kept, generator=gen, device=w.device)
    # |w| into a reused buffer: a fresh one pays a page fault per 4 KiB, a third of inject's time at 860M weights
    w = w.detach()
    return topk_mask(torch.abs(w, out=buffer("inject.magnitude", w.shape, w.dtype, w.device)), lp.kept)


def inject(
    model: nn.Module,
    plan: Plan,
    init: str = "magnitude",
    masks: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    lambda_w: float = 0.0,
    adopt: bool = False,
) -> nn.Module:
    """Register a mask parametrization on every planned tensor of ``model``, in place; returns ``model``.

    init: "magnitude" keeps the largest |w| (pruning a trained checkpoint), "random" draws an exact-count random
    mask (sparse training from scratch, Static-DM). ``masks`` gives explicit masks by FQN (used by load).
    Weights at pruned positions are set to 0 and kept 0 (the forward reads them as stored, the gradient is masked,
    loading a state dict re-zeros them), so original == effective for fixed masks.
    adopt: for a loader that has just written the weights: the given ``masks`` are taken as they are (not copied;
    the caller gives them up) and the weights are already 0 wherever they prune (not zeroed again).
    """
    check_module(model)
    check_arg(
        plan, Plan, "plan", "a surgeon.masking.plan.Plan", "make one with surgeon.plan(model, sparsity=...) or nm='2:4'"
    )
    check_arg(seed, int, "seed", "an integer")
    check_arg(lambda_w, (int, float), "lambda_w", "a number")
    if not math.isfinite(lambda_w) or lambda_w < 0:
        raise SurgeonError(f"lambda_w must be a finite number ≥ 0, got {lambda_w}", "0 turns the SR-STE decay off")
    if init not in INITS:
        raise SurgeonError(f"unknown mask init {init!r}", f"choose one of: {', '.join(INITS)}")
    existing = sites(model)
    gen = generator(seed)
    # check every planned tensor before touching any, so a bad plan leaves the model as it was
    todo = []
    for fqn, lp in plan.layers.items():
        if lp.is_dense:
            continue
        if fqn in existing:
            raise SurgeonError(f"{fqn} is already masked", "call surgeon.fold or surgeon.remove first")
        module_name, name = _split(fqn)
        try:
            module = model.get_submodule(module_name)
            w = getattr(module, name)
        except AttributeError:
            raise SurgeonError(
                f"plan names {fqn!r}, which the model does not have", "make the plan from this model"
            ) from None
        if tuple(w.shape) != tuple(lp.shape):
            raise SurgeonError(
                f"mask shape mismatch for {fqn}: plan has {list(lp.shape)}, model has {list(w.shape)}",
                "the plan or saved masks belong to a different model",
            )
        mask = None
        if lp.nm is None and masks is not None:
            if fqn not in masks:
                raise SurgeonError(f"no mask given for {fqn}", "the saved masks do not match the plan")
            mask = masks[fqn].to(device=w.device, dtype=torch.bool)
            if tuple(mask.shape) != tuple(w.shape):
                raise SurgeonError(
                    f"mask shape mismatch for {fqn}: mask {list(mask.shape)}, weight {list(w.shape)}",
                    "the masks belong to a different model",
                )
        todo.append((module, name, w, lp, mask))
    for module, name, w, lp, mask in todo:
        if lp.nm is not None:
            # unsafe: both parametrizations keep shape and dtype, so skip parametrize's checking forward pass
            _own_class(module)
            parametrize.register_parametrization(module, name, NMMask(*lp.nm, lambda_w, plan, lp), unsafe=True)
            continue
        made = mask is None
        if made:
            mask = _initial_mask(w, lp, init, gen)
        _own_class(module)
        parametrization = Mask(mask, plan, lp, adopt=made or adopt)
        parametrization.adopting = w  # registering zeros the pruned weights in place, once (Mask.right_inverse)
        parametrization.adopting_zeroed = adopt and not made
        parametrize.register_parametrization(module, name, parametrization, unsafe=True)
        parametrization.adopting, parametrization.adopting_zeroed = None, False
        parametrization.mask_gradient_of(module.parametrizations[name].original, module, name)
        module.parametrizations[name].register_load_state_dict_post_hook(_zero_pruned_after_load)
    for site in sites(model).values():
        module = site.module
        if isinstance(module, nn.RNNBase) and _rnn_release_flat_weights not in module._forward_hooks.values():
            module.register_forward_hook(_rnn_release_flat_weights)
        if site.is_nm and recomputing not in module._forward_pre_hooks.values():
            # the effective weight is recomputed in backward, not saved (surgeon.masking.recompute)
            module.register_forward_pre_hook(recomputing)
            module.register_forward_hook(recomputed, always_call=True)
    return model


def _strip(model: nn.Module, leave_parametrized: bool) -> nn.Module:
    check_module(model)
    for site in sites(model).values():
        _own_class(site.module)
        if isinstance(site.parametrization, Mask):
            site.parametrization.release_gradient()  # the weight is a plain one again: its gradient is not masked
        parametrize.remove_parametrizations(site.module, site.name, leave_parametrized=leave_parametrized)
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook in (_rnn_release_flat_weights, recomputed):
                del module._forward_hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is recomputing:
                del module._forward_pre_hooks[key]
    return model


def fold(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights and remove the parametrizations: a plain module, stock state_dict keys."""
    return _strip(model, leave_parametrized=True)


def remove(model: nn.Module) -> nn.Module:
    """Remove the parametrizations and keep the stored (original) tensors, e.g. a SparseDM student's dense W."""
    return _strip(model, leave_parametrized=False)
