"""What a model keeps and costs, measured: sparsity, kept parameters and FLOPs in one function.

``measure(model)`` counts, for every target tensor (the planned layers of a masked model, else every Linear/Conv/
RNN weight), the positions its mask keeps (a masked tensor) or its nonzeros (a plain tensor, e.g. a folded export).
Given an input, it also counts FLOPs after Evci et al. (2020), as the sparse diffusion papers do:

- dense FLOPs of each layer from ``torch.utils.flop_counter`` on one forward pass of the real input shapes
  (a module with several target tensors, like a GRU, shares its FLOPs in proportion to their sizes);
- sparse inference FLOPs = Σ_layers density_l · dense_FLOPs_l, plus the FLOPs outside target layers (attention
  products, ...) in full;
- training FLOPs per example and step: dense and static/MagRan 3 × inference (forward, and a backward pass of
  twice the forward); RigL adds its dense gradient at update steps: (3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1); N:M
  straight-through training computes the dense weight gradient every step: 2·f_S + f_D.

FLOPs count multiply and add separately (one multiply-accumulate = 2 FLOPs), as ``torch.utils.flop_counter`` does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from surgeon.masking.shards import full
from surgeon.masking.surgery import get_plan, sites
from surgeon.masking.targets import find_targets
from surgeon.seeding import generator
from surgeon.tasks.base import to_device


@dataclass
class LayerCost:
    name: str  # parameter FQN
    kind: str  # linear | conv | rnn
    shape: tuple[int, ...]
    masked: str  # "mask", "n:m" or "" (plain)
    numel: int
    kept: int
    flops: float | None = None  # dense forward FLOPs of this tensor's products, for the measured input

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 1.0


@dataclass
class Measurement:
    layers: list[LayerCost]
    params_total: int  # every parameter of the model
    flops_dense: float | None = None  # one forward pass of the measured input, every weight dense
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def target_params(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def target_kept(self) -> int:
        return sum(r.kept for r in self.layers)

    @property
    def params_kept(self) -> int:
        """Every parameter that is not pruned: tensors outside the targets count in full."""
        return self.params_total - (self.target_params - self.target_kept)

    @property
    def sparsity(self) -> float:
        """Fraction of target weights pruned (layers a budget left dense count as kept)."""
        return 1.0 - self.target_kept / self.target_params if self.target_params else 0.0

    @property
    def flops_sparse(self) -> float | None:
        """Inference FLOPs of one forward pass: each target layer scaled by its density, the rest dense."""
        if self.flops_dense is None:
            return None
        return self.flops_dense - sum((1.0 - r.density) * (r.flops or 0.0) for r in self.layers)

    def training_flops(self, algorithm: str, delta_t: int | None = None) -> float | None:
        """Training FLOPs per example and step for ``algorithm`` (dense, static, magran, rigl, nm_ste)."""
        f_d, f_s = self.flops_dense, self.flops_sparse
        if f_d is None:
            return None
        if algorithm == "dense":
            return 3.0 * f_d
        if algorithm == "rigl":
            dt = max(int(delta_t or 1), 1)
            return (3.0 * f_s * dt + 2.0 * f_s + f_d) / (dt + 1)
        if algorithm == "nm_ste":
            return 2.0 * f_s + f_d
        return 3.0 * f_s  # static, magran: sparse forward and backward; MagRan's regrowth needs no gradient

    def run_flops(self, recipe, steps: int | None = None) -> float | None:
        """Training FLOPs of a whole run of ``recipe`` (a Recipe): per-example step FLOPs, plus a distillation
        teacher's dense forward, × batch × gradient accumulation × ``steps`` (default: the recipe's)."""
        per_step = self.training_flops(recipe.algorithm, recipe.dst.delta_t if recipe.dst else None)
        if per_step is None:
            return None
        if recipe.distill is not None:
            per_step += self.flops_dense  # the teacher's forward pass (dense) on every example
        t = recipe.training
        return per_step * t.batch_size * t.grad_accum * (t.steps if steps is None else steps)

    def to_dict(self) -> dict:
        return {
            "params_total": self.params_total,
            "params_kept": self.params_kept,
            "target_params": self.target_params,
            "target_kept": self.target_kept,
            "sparsity": self.sparsity,
            "flops_dense": self.flops_dense,
            "flops_sparse": self.flops_sparse,
            "input_shapes": self.input_shapes,
            "layers": [{**asdict(r), "shape": list(r.shape), "density": r.density} for r in self.layers],
        }


def _targets(model: nn.Module, include, exclude, planned_only: bool):
    """The planned tensors of a masked model (what its budget covers), else every target the walker finds."""
    found = find_targets(model, include, exclude)
    plan = get_plan(model)
    if planned_only and plan is not None and include is None and exclude is None:
        return {fqn: t for fqn, t in found.items() if fqn in plan.layers}
    return found


@torch.no_grad()
def kept_positions(model: nn.Module, include=None, exclude=None, planned_only: bool = True):
    """For each measured target: (fqn, target, masked kind, kept positions, stored tensor), one at a time.

    Kept positions are the mask of a masked tensor (an N:M mask computed once, here) and the nonzeros of a plain
    one; the stored tensor is what the optimizer sees (for a masked one, its parametrization's original).
    """
    masked = sites(model)
    for fqn, t in _targets(model, include, exclude, planned_only).items():
        site = masked.get(fqn)
        if site is not None:
            yield fqn, t, ("n:m" if site.is_nm else "mask"), site.mask, site.original
        else:
            stored = full(getattr(t.module, t.tensor_name))  # a shard of an FSDP2 model: gathered (a collective)
            yield fqn, t, "", stored != 0, stored


def _shapes(inputs: Any, prefix: str = "input") -> dict[str, list[int]]:
    if torch.is_tensor(inputs):
        return {prefix: list(inputs.shape)}
    if isinstance(inputs, dict):
        return {k: s for key, v in inputs.items() for k, s in _shapes(v, str(key)).items()}
    if isinstance(inputs, (list, tuple)):
        return {k: s for i, v in enumerate(inputs) for k, s in _shapes(v, f"{prefix}.{i}").items()}
    return {}


@torch.no_grad()
def module_flops(model: nn.Module, run: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Total FLOPs of ``run()`` and the FLOPs each module's own products take (keyed by module FQN, "" = root)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        fqn = "" if name == root else name[len(root) + 1 :] if name.startswith(root + ".") else name
        per_module[fqn] = float(sum(ops.values()))
    return float(counter.get_total_flops()), per_module


def measure(
    model: nn.Module,
    inputs: Any = None,
    predict: Callable[[nn.Module, Any], Any] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    planned_only: bool = True,
) -> Measurement:
    """Sparsity and kept parameters of ``model``; with ``inputs`` (one example), its FLOPs too.

    The tensors measured are those the model's plan covers (``planned_only``, the default; a model without a plan
    has all its targets measured), or every target the graph walker finds, narrowed by ``include``/``exclude``.

    ``predict(model, inputs)`` runs one forward pass (default: ``model(inputs)``, or ``model(**inputs)`` for a
    dict); a Task's ``predict`` fits as it is (see :func:`task_inputs`).
    """
    layers = [
        LayerCost(fqn, t.kind, t.shape, kind, t.numel, int(keep.count_nonzero()))
        for fqn, t, kind, keep, _ in kept_positions(model, include, exclude, planned_only)
    ]
    result = Measurement(layers, sum(p.numel() for p in model.parameters()))
    if inputs is None:
        return result
    if predict is None:

        def predict(m, x):
            return m(**x) if isinstance(x, dict) else m(x)

    was_training = model.training
    model.eval()
    try:
        total, per_module = module_flops(model, lambda: predict(model, inputs))
    finally:
        model.train(was_training)
    by_module: dict[str, list[LayerCost]] = defaultdict(list)
    for r in layers:
        by_module[r.name.rsplit(".", 1)[0] if "." in r.name else ""].append(r)
    for module_name, rows in by_module.items():
        flops = per_module.get(module_name, 0.0)
        size = sum(r.numel for r in rows)
        for r in rows:  # several tensors of one module (GRU ih/hh weights) share its FLOPs by size
            r.flops = flops * r.numel / size if size else 0.0
    result.flops_dense = total
    result.input_shapes = _shapes(inputs)
    return result


def task_inputs(task, model: nn.Module) -> tuple[dict, Callable]:
    """One real training example of ``task`` as model inputs (a median-length one for sequences), and the
    task's forward call, for :func:`measure`."""
    data = task.dataset("train")
    if data is None or len(data) == 0:
        data = task.dataset("val")
    lengths = getattr(data, "lengths", None)
    index = 0
    if lengths is not None and len(lengths):
        order = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))
        index = order[len(order) // 2]
    batch = task.collate([data[index]])
    device = next(model.parameters()).device
    inputs, _, _ = task.noisy_batch(to_device(batch, device), generator(0))
    return inputs, task.predict


def measure_task(model: nn.Module, task) -> Measurement:
    """:func:`measure` on one real example of ``task``."""
    inputs, predict = task_inputs(task, model)
    return measure(model, inputs, predict)
