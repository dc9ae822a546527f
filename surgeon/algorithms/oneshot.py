"""The one-shot pruning engine: calibration passes, block order, and the masks injected at the end.

Blocks. A block is a unit whose layers are pruned together from the same inputs: each element of a top-level
ModuleList/Sequential (a UNet's ``down_blocks.0``, ``mid_block``'s siblings, a DiT's ``transformer_blocks.3``, a
ChiroDiff ``rnn.1``), every other top-level child that holds targets (``conv_in``, ``time_embedding``,
``proj_out_1``), and, for a multi-layer ``nn.GRU``/``nn.LSTM`` that is a block by itself, each of its layers (both
directions). Blocks run in the order the model first calls them.

``sequential`` (SparseGPT's setting): block after block, each block's statistics come from the model with every
earlier block already pruned; the pruned weights of a block are written when the whole block is done.
``parallel``: every layer's statistics from the dense model; everything is written at the end.

Passes and memory: SparseGPT holds one layer's Hessian at a time. Per block, one pass (ended where the block
starts) captures the block's inputs for every calibration batch; then each of its layers takes one run of the block
alone on those inputs. Wanda's per-column norms are small, so a block (sequential) or the whole model (parallel)
shares one pass, ended as soon as its block has run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from surgeon.algorithms.calibration import Calibration
from surgeon.algorithms.pruners import Pattern, Pruner
from surgeon.algorithms.statistics import (
    InputStats,
    as_matrix,
    capture_inputs,
    collecting,
    from_matrix,
    run_block,
    run_pass,
)
from surgeon.errors import SurgeonError
from surgeon.masking.plan import LayerPlan, Plan
from surgeon.masking.surgery import inject
from surgeon.masking.targets import Target, find_targets
from surgeon.progress import WorkProgress

_RNN_LAYER = re.compile(r"_l(\d+)(_reverse)?$")


@dataclass
class Block:
    name: str
    module: nn.Module  # ends a pass early once it has run
    targets: dict[str, Target] = field(default_factory=dict)


def block_key(model: nn.Module, target: Target) -> tuple[str, nn.Module]:
    """(block name, block module) of one target, as the module docstring defines blocks."""
    parts = target.module_name.split(".") if target.module_name else []
    if not parts:
        return "", model
    top = model.get_submodule(parts[0])
    if isinstance(top, (nn.ModuleList, nn.Sequential)) and len(parts) > 1:
        name = ".".join(parts[:2])
        return name, model.get_submodule(name)
    if isinstance(top, nn.RNNBase) and len(parts) == 1 and top.num_layers > 1:
        return f"{parts[0]}[layer {_RNN_LAYER.search(target.tensor_name).group(1)}]", top
    return parts[0], top


def make_blocks(model: nn.Module, targets: Mapping[str, Target], calibration: Calibration) -> list[Block]:
    """The blocks of ``targets``, in the order one dense forward of the first calibration batch first runs them."""
    blocks: dict[str, Block] = {}
    for fqn, t in targets.items():
        name, module = block_key(model, t)
        blocks.setdefault(name, Block(name, module)).targets[fqn] = t
    first_call: dict[int, int] = {}

    def seen(module: nn.Module, args) -> None:  # a pre-hook that returned a value would replace the inputs
        first_call.setdefault(id(module), len(first_call))

    handles = [b.module.register_forward_pre_hook(seen) for b in blocks.values()]
    try:
        one = Calibration(calibration.batches[:1], calibration.predict, calibration.padding[:1], [None])
        run_pass(model, one, None)
    finally:
        for h in handles:
            h.remove()
    never = [b for b in blocks.values() if id(b.module) not in first_call]
    if never:
        raise SurgeonError(
            f"{next(iter(never[0].targets))} never runs on the calibration inputs, so it has no statistics",
            "exclude it with --exclude, or check that the data fits the model (conditioning, shapes)",
        )
    return sorted(blocks.values(), key=lambda b: first_call[id(b.module)])


def pattern_of(lp: LayerPlan) -> Pattern:
    return Pattern(nm=lp.nm) if lp.nm is not None else Pattern(kept=lp.kept)


@dataclass
class PruneReport:
    method: str
    sequential: bool
    layers: int
    blocks: int
    passes: int  # calibration passes run (each may end early, after its block)
    seconds: float


def prune_model(
    model: nn.Module,
    plan: Plan,
    pruner: Pruner,
    calibration: Calibration | None,
    sequential: bool = True,
    progress: bool = True,
) -> PruneReport:
    """Prune every planned target of ``model`` in place with ``pruner``, then inject the fixed masks it chose.

    N:M layers get fixed masks of density N/M that are N:M-valid along the reduction dimension (like ASP's), so the
    saved model is the pruned one exactly; unstructured layers keep exactly their planned count.
    """
    started = time.perf_counter()
    layers = {f: lp for f, lp in plan.layers.items() if not lp.is_dense}
    targets = {f: t for f, t in find_targets(model).items() if f in layers}
    if pruner.needs != "none" and calibration is None:
        raise SurgeonError(f"--method {pruner.name} needs calibration data", "pass --data (e.g. --data kanjivg)")
    was_training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    passes = 0
    try:
        if pruner.needs == "none":
            blocks = [Block("model", model, dict(targets))]
        else:
            blocks = make_blocks(model, targets, calibration)
            passes += 1
        pending: dict[str, torch.Tensor] = {}
        with WorkProgress(f"prune ({pruner.name})", len(targets), enabled=progress) as bar:
            for block in blocks:
                if pruner.needs == "hessian":  # one layer's Hessian at a time
                    groups = [{f: t} for f, t in block.targets.items()]
                elif pruner.needs == "norms" and not sequential:
                    groups = [dict(targets)] if block is blocks[0] else []
                else:
                    groups = [dict(block.targets)]
                # SparseGPT: the block's inputs are captured once (from the model as pruned so far, or the
                # dense one), then each layer's pass runs the block alone on them
                inputs = None
                if pruner.needs == "hessian" and block.module is not model:
                    inputs = capture_inputs(model, calibration, block.module)
                    passes += 1
                for group in groups:
                    stats: dict[str, InputStats] = {}
                    if pruner.needs != "none":
                        with collecting(group, hessian=pruner.needs == "hessian") as (stats, ctx):
                            if inputs is not None:
                                run_block(block.module, inputs, calibration, ctx)
                            else:
                                stop = block.module if sequential else None
                                run_pass(model, calibration, ctx, None if stop is model else stop)
                            passes += 1
                    for fqn, t in group.items():
                        w = getattr(t.module, t.tensor_name)
                        if pruner.needs != "none" and stats[fqn].count == 0:
                            raise SurgeonError(
                                f"{fqn} saw no calibration inputs (every position padded?)",
                                "calibrate on more examples, or exclude the layer",
                            )
                        new, keep = pruner.prune(as_matrix(w.detach()), stats.get(fqn), pattern_of(layers[fqn]), fqn)
                        masks[fqn] = from_matrix(keep, w.shape)
                        pending[fqn] = from_matrix(new, w.shape).to(w.dtype)
                        stats.pop(fqn, None)
                        bar.advance()
                del inputs
                if sequential:
                    _write(targets, pending)
            _write(targets, pending)
    finally:
        model.train(was_training)
    fixed = Plan(
        {f: LayerPlan(lp.kind, lp.shape, density=lp.nm[0] / lp.nm[1]) if lp.nm else lp for f, lp in layers.items()},
        dict(plan.skipped),
        plan.sparsity,
        plan.distribution,
        plan.nm,
    )
    inject(model, fixed, masks=masks)
    return PruneReport(pruner.name, sequential, len(targets), len(blocks), passes, time.perf_counter() - started)


def _write(targets: Mapping[str, Target], pending: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for fqn, new in pending.items():
            t = targets[fqn]
            getattr(t.module, t.tensor_name).copy_(new)
    pending.clear()
