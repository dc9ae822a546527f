"""What a model's target weights actually keep: per-layer density and N:M validity, measured, never taken from a plan.

Works on plain and masked models alike. Density counts the mask of a masked tensor (a kept weight may be zero)
and the nonzeros of a plain one; N:M validity asks whether the effective weight has at most N nonzeros in every
group of M along the reduction dimension (the grouping of :func:`surgeon.sparsity.nm_groups`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn

from surgeon.errors import check_module
from surgeon.masking.measure import LayerCost, Measurement, kept_positions
from surgeon.masking.shards import gathered, model_is_sharded
from surgeon.sparsity.patterns import nm_groups, nm_skip_reason, parse_nm


@dataclass
class Row(LayerCost):
    """A measured target tensor (see :class:`surgeon.masking.measure.LayerCost`) and whether it is N:M valid."""

    nm_valid: bool | None = None  # None when the pattern does not apply; nm_reason says why
    nm_reason: str | None = None


@dataclass
class Report:
    nm: tuple[int, int]
    rows: list[Row]
    model_params: int  # every parameter of the model, targets or not

    @property
    def measured(self) -> Measurement:
        return Measurement(list(self.rows), self.model_params)

    @property
    def target_params(self) -> int:
        return self.measured.target_params

    @property
    def kept(self) -> int:
        return self.measured.target_kept

    @property
    def sparsity(self) -> float:
        return self.measured.sparsity

    @property
    def totals(self) -> dict:
        return {
            "target_params": self.target_params,
            "kept": self.kept,
            "sparsity": self.sparsity,
            "model_params": self.model_params,
            "nm_valid_layers": sum(r.nm_valid is True for r in self.rows),
            "nm_applicable_layers": sum(r.nm_valid is not None for r in self.rows),
        }

    def to_dict(self) -> dict:
        return {
            "nm": f"{self.nm[0]}:{self.nm[1]}",
            "rows": [
                {k: v for k, v in asdict(r).items() if k != "flops"} | {"shape": list(r.shape), "density": r.density}
                for r in self.rows
            ],
            "totals": self.totals,
        }


def report(
    model: nn.Module,
    nm: str | tuple[int, int] = "2:4",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> Report:
    check_module(model)
    n, m = parse_nm(nm)
    # an FSDP2-sharded model is read gathered (every rank calls this): the effective weights as one process has them
    with gathered(model) if model_is_sharded(model) else nullcontext():
        rep = _report(model, n, m, include, exclude)
    return rep


def _report(model: nn.Module, n: int, m: int, include, exclude) -> Report:
    rows = []
    for fqn, t, kind, keep, stored in kept_positions(model, include, exclude, planned_only=False):
        # the effective weight's nonzeros: kept and not 0 in storage (each N:M mask is computed once, above)
        nonzero = keep & (stored != 0)
        reason = nm_skip_reason(t.shape, m)
        valid = None if reason else bool((torch.count_nonzero(nm_groups(nonzero, m), dim=1) <= n).all())
        rows.append(Row(fqn, t.kind, t.shape, kind, t.numel, int(keep.count_nonzero()), None, valid, reason))
    return Report((n, m), rows, sum(p.numel() for p in model.parameters()))


def nm_coverage(model: nn.Module, nm: str | tuple[int, int]) -> dict:
    """For run summaries: how many target layers were converted to N:M and are N:M-valid (measured), and every
    layer left dense with the reason (the plan's, e.g. a reduction size not divisible by M, or not selected)."""
    from surgeon.masking.surgery import get_plan, sites

    rep = report(model, nm=nm)
    plan = get_plan(model)
    skipped = plan.skipped if plan is not None else {}
    converted = set(sites(model))
    left_dense = {
        r.name: skipped.get(r.name) or r.nm_reason or "not selected (include/exclude, dense_first/last)"
        for r in rep.rows
        if r.name not in converted
    }
    valid = sum(1 for r in rep.rows if r.name in converted and r.nm_valid)
    n, m = rep.nm
    return {
        "pattern": f"{n}:{m}",
        "layers": len(rep.rows),
        "converted": len(converted),
        "nm_valid": valid,
        "nm_valid_fraction": valid / len(rep.rows) if rep.rows else 0.0,
        "left_dense": left_dense,
    }
